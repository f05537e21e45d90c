"""Sentence embeddings for memory keys and queries, read off the base model.

    features(text) = [mean of the token embeddings ; mean of the final hidden states]
                     (; the same two means weighted a / (a + p(token)) when sif_a > 0)
    key(text)      = normalize(W_doc   @ features)   (what memories are stored under)
    query(text)    = normalize(W_query @ features)   (what a question searches with)

The base model is frozen; only the two projections (2D -> dim each) are trained, with
InfoNCE over (question, statement) pairs and in-batch negatives (`train_retriever`).
Keys and queries get separate projections because a question and the sentence that
answers it do not look alike ("Where was X born?" vs "X was born in Oslo."). Cosine
similarity of unit vectors = inner product, so the FAISS index is an inner-product
one and scores are comparable across queries: `min_score` (fitted by
`fit_min_score`) separates a relevant hit from the best of the irrelevant ones, and
`size_floors` (`fit_size_floors`) does so per store size.

The weighted means are SIF pooling (Arora et al. 2017): p is each token's frequency in
the retriever's training text (`fit_token_weights`), so rare tokens -- the names that
tell one person's fact from another's -- weigh more than the template words every
question shares. Measured on the QA world's validation split (`hmst.inference.build`:
12k facts, 600 steps, a 592-statement store): at the threshold keeping 98.1% of
relevant hits, plain means let 11.0% of questions with nothing stored through,
means + SIF 0.5%.

Legend: B batch, T tokens, D d_model, F = 2D (4D with SIF) features, K dim, V vocab.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hmst.checkpoint import write_dir_atomic

WEIGHTS_FILE = "retriever.safetensors"
CONFIG_FILE = "retriever.json"


@dataclass
class RetrieverConfig:
    d_model: int
    dim: int = 256
    min_score: float = 0.5
    """Hits scoring below this are not valid (fitted by `fit_min_score`)."""
    temperature: float = 0.05
    sif_a: float = 0.0
    """> 0: add SIF-weighted means to the features (see the module docstring); 0:
    plain means only."""
    vocab_size: int = 0
    """Size of the token-weight table (needed when sif_a > 0)."""
    size_floors: list | None = None
    """[[n, cut], ...] by ascending n: the valid-hit threshold for a memory holding n
    entries (`fit_size_floors`). The best irrelevant hit is the best of n, so it
    rises with n, and one cut fitted on a large store drops relevant lines of a
    small buffer (measured on the QA world: 4 of 150 episodic questions). A memory of
    n entries uses the cut of the largest fitted size <= n; None: `min_score`."""

    def __post_init__(self):
        if self.sif_a < 0:
            raise ValueError(f"sif_a must be >= 0, got {self.sif_a}")
        if self.sif_a > 0 and self.vocab_size < 1:
            raise ValueError("sif_a > 0 needs the tokenizer's vocab_size")

    def floor(self, size: int) -> float:
        """The valid-hit threshold for a memory holding `size` entries."""
        if not self.size_floors:
            return self.min_score
        cut = self.size_floors[0][1]
        for n, c in self.size_floors:
            if n <= size:
                cut = c
        return cut

    @property
    def num_features(self) -> int:
        return (4 if self.sif_a > 0 else 2) * self.d_model


def pool_features(emb_BTD, hidden_BTD, valid_BT1=None) -> torch.Tensor:
    """(B, 2D) = [mean token embedding ; mean final hidden state] over the valid
    positions: the features of a text, for the retriever and the engine's probe."""
    if valid_BT1 is None:
        valid_BT1 = emb_BTD.new_ones(emb_BTD.shape[0], emb_BTD.shape[1], 1)
    n = valid_BT1.sum(1)
    mean = lambda x: (x * valid_BT1).sum(1) / n  # noqa: E731
    return torch.cat([mean(emb_BTD), mean(hidden_BTD)], 1).float()


class Retriever(nn.Module):
    def __init__(self, config: RetrieverConfig):
        super().__init__()
        self.config = config
        f = config.num_features
        if config.sif_a > 0:  # a / (a + p(token)); p fitted by fit_token_weights
            self.register_buffer("token_weight", torch.ones(config.vocab_size))
        self.query_proj = nn.Linear(f, config.dim, bias=False)
        self.doc_proj = nn.Linear(f, config.dim, bias=False)
        with torch.no_grad():  # start as a random projection of the same features
            self.doc_proj.weight.copy_(self.query_proj.weight)

    @property
    def dim(self) -> int:
        return self.config.dim

    @torch.no_grad()
    def fit_token_weights(self, token_lists) -> None:
        """Set the SIF weights a / (a + p) from the token frequencies p of
        `token_lists` (the retriever's training texts, tokenized)."""
        if self.config.sif_a <= 0:
            raise ValueError("this retriever has no token weights (sif_a = 0)")
        counts = torch.zeros(self.config.vocab_size, dtype=torch.float64)
        for ids in token_lists:
            counts.index_add_(
                0, torch.as_tensor(ids, dtype=torch.long), torch.ones(len(ids)).double()
            )
        p = counts / counts.sum().clamp_min(1.0)
        self.token_weight.copy_((self.config.sif_a / (self.config.sif_a + p)).float())

    def pool(self, ids_BT, emb_BTD, hidden_BTD, valid_BT1=None) -> torch.Tensor:
        """(B, F) features of texts from the base model's token embeddings and final
        hidden states (the engine's probe calls this on its own forward pass)."""
        feats = pool_features(emb_BTD, hidden_BTD, valid_BT1)
        if self.config.sif_a <= 0:
            return feats
        w = self.token_weight.to(ids_BT.device)[ids_BT][..., None]
        if valid_BT1 is not None:
            w = w * valid_BT1
        w = (w / w.sum(1, keepdim=True)).to(emb_BTD.dtype)
        return torch.cat(
            [feats, (emb_BTD * w).sum(1).float(), (hidden_BTD * w).sum(1).float()], 1
        )

    @torch.no_grad()
    def features(self, model, tokenizer, texts: list[str], batch_size: int = 64):
        """(N, F) frozen features of `texts` (right-padded batches; the model is
        causal, so padding after a text never changes it)."""
        device = model.embed.weight.device
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = [tokenizer.encode(t) or [0] for t in texts[i : i + batch_size]]
            max_len = model.config.max_seq_len
            chunk = [ids[-max_len:] for ids in chunk]
            T = max(len(c) for c in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long, device=device)
            valid = torch.zeros(len(chunk), T, 1, device=device)
            for j, c in enumerate(chunk):
                ids[j, : len(c)] = torch.tensor(c, device=device)
                valid[j, : len(c)] = 1
            hidden = model(ids, return_hidden=True)["hidden_states"]
            out.append(self.pool(ids, model.embed(ids), hidden, valid))
        return torch.cat(out).cpu()

    def embed_features(self, feats_NF: torch.Tensor, kind: str) -> torch.Tensor:
        proj = {"query": self.query_proj, "doc": self.doc_proj}[kind]
        return F.normalize(proj(feats_NF), dim=-1)

    @torch.no_grad()
    def encode(self, model, tokenizer, texts: list[str], kind: str = "query"):
        """(N, dim) unit vectors, float32 on the CPU."""
        return self.embed_features(self.features(model, tokenizer, texts), kind)


def train_retriever(
    retriever: Retriever,
    q_feats: torch.Tensor,
    d_feats: torch.Tensor,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    negatives: str = "all",
) -> list[float]:
    """InfoNCE: question i should score its own statement (row i of `d_feats`) above
    the others. `negatives="all"`: every training statement is a candidate in every
    step (what a search over the whole store asks for; measured on the QA world's
    924-statement semantic memory: top-1 99.7% vs 97.5% with in-batch negatives);
    `"batch"`: only the batch's statements. Returns the loss per step."""
    if negatives not in ("all", "batch"):
        raise ValueError(f"negatives must be all or batch, not {negatives!r}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(retriever.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(q_feats), (batch_size,), generator=g)
        q = retriever.embed_features(q_feats[idx], "query")
        if negatives == "all":
            d, labels = retriever.embed_features(d_feats, "doc"), idx
        else:
            d = retriever.embed_features(d_feats[idx], "doc")
            labels = torch.arange(batch_size)
        loss = F.cross_entropy(q @ d.T / retriever.config.temperature, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def fit_min_score(
    pos_scores: torch.Tensor, neg_scores: torch.Tensor, min_recall: float = 0.98
) -> float:
    """The valid-hit threshold from relevant hits (`pos_scores`: each question's own
    statement) and the best irrelevant hit of questions whose answer is not stored
    (`neg_scores`): the cut with the best accuracy among those keeping at least
    `min_recall` of the relevant hits (a missed fact costs an answer; an irrelevant
    line in the context costs little: the LM is trained to read past it)."""
    s = torch.cat([pos_scores, neg_scores]).sort().values
    cuts = torch.cat([s[:1] - 1e-3, (s[1:] + s[:-1]) / 2, s[-1:] + 1e-3])
    recall = torch.stack([(pos_scores >= c).float().mean() for c in cuts])
    acc = torch.stack(
        [((pos_scores >= c).sum() + (neg_scores < c).sum()).float() for c in cuts]
    )
    acc = torch.where(recall >= min_recall, acc, torch.full_like(acc, -1.0))
    return float(cuts[int(acc.argmax())])


def fit_size_floors(
    pos_scores: torch.Tensor,
    neg_sims: torch.Tensor,
    sizes,
    min_recall: float = 0.98,
    seed: int = 0,
) -> list:
    """`RetrieverConfig.size_floors`: for each store size n, `fit_min_score` of the
    relevant hits against each no-answer question's best score among n entries drawn
    at random from its row of `neg_sims` (questions x stored entries)."""
    g = torch.Generator().manual_seed(seed)
    Q, S = neg_sims.shape
    out = []
    for n in sorted(set(min(int(n), S) for n in sizes)):
        pick = torch.rand(Q, S, generator=g).argsort(1)[:, :n]
        neg = neg_sims.gather(1, pick).max(1).values
        out.append([n, fit_min_score(pos_scores, neg, min_recall)])
    return out


def save_retriever(path: str, retriever: Retriever, extra: dict | None = None):
    def write(tmp):
        save_file(
            {k: v.contiguous() for k, v in retriever.state_dict().items()},
            os.path.join(tmp, WEIGHTS_FILE),
        )
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump({"config": asdict(retriever.config), "extra": extra or {}}, f)

    write_dir_atomic(path, write)


def load_retriever(path: str) -> Retriever:
    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(cfg_path) or not os.path.isfile(w_path):
        raise FileNotFoundError(f"no retriever at {path} (need {CONFIG_FILE})")
    try:
        with open(cfg_path) as f:
            cfg = RetrieverConfig(**json.load(f)["config"])
        state = load_file(w_path)
    except (json.JSONDecodeError, KeyError, TypeError, SafetensorError, OSError) as e:
        raise ValueError(f"corrupt retriever at {path}: {e}") from e
    r = Retriever(cfg)
    r.load_state_dict(state)
    return r
