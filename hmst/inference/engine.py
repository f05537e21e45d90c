"""HMSTInferenceEngine: one query through controller, memories, LM and critic.

Per query (`engine.answer(query)`):

    1. probe     the bare prompt through the LM once: the first answer token's
                 distribution (max-prob, entropy, margin) and the retriever's query
                 vector come from this one forward
    2. decide    the meta-controller maps (query vector, state features) to five
                 decisions: early_exit, episodic, semantic, verification and
                 expert_weights (or `decisions=` forces any of them; a `policy="fixed"`
                 engine uses `config.fixed_decisions`)
    3. retrieve  episodic (the recent-interaction buffer) and/or semantic (FAISS)
                 memory, as decided; hits scoring under the retriever's floor for
                 that memory's size (`RetrieverConfig.floor`) are reported but not
                 used (requested vs valid hits)
    4. generate  the prompt with the best `context_k` valid hits of both memories as
                 context lines, greedy by default,
                 with the KV cache; `early_exit` decodes with the exit heads (tokens
                 leave after an intermediate block when confident); `expert_weights`
                 bias routing when `config.expert_bias_strength` > 0
    5. verify    if decided and a critic is loaded: the critic scores (question,
                 evidence, answer); below `critic_threshold` the engine abstains

It returns a `QueryResult`: the answer, whether it abstained, every decision with its
probability, every memory hit (source, id, score, text, valid), the critic verdict,
blocks evaluated per generated token, latency and per-component timings. With an
observer registered or a mode other than `off`, the same facts go out as events
(controller_decision, memory_retrieval, critic_verdict, early_exit, timing, and the
generation's own) and `--trace`-style JSONL through `hmst.observe.TraceRecorder`.

A saved system (`save_pretrained` / `from_pretrained`) is one directory:

    manifest.json      format, version, component list with file hashes, engine config
    model/             BaseMoEModel checkpoint (safetensors + config + tokenizer)
    retriever/         query/key projections (hmst.memory.retriever)
    semantic_memory/   SemanticMemory snapshot (FAISS index + SQLite texts)
    episodic_memory/   EpisodicMemory snapshot
    critic/            CriticModel + its tokenizer      (optional)
    early_exit/        exit heads + tuned threshold     (optional)
    controller/        StateSummaryEncoder + MetaController (optional; PPO output)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from hmst.checkpoint import load_pretrained, save_model_dir, write_dir_atomic
from hmst.generation.fast_forward import fast_logits
from hmst.generation.generate import generate_stream
from hmst.generation.sampling import SamplingParams
from hmst.memory.retriever import pool_features
from hmst.models.meta_controller import DECISIONS
from hmst.observe.hooks import ObserverRegistry, check_mode
from hmst.observe.trace import logit_summary
from hmst.qa import ABSTAIN, format_prompt

FEATURES = (
    "max_prob",  # first answer token: top probability
    "entropy",  # its entropy / ln V
    "margin",  # top-1 minus top-2 probability
    "query_len",  # prompt tokens / context length
    "episodic_fill",  # entries / capacity of the recent-interaction buffer
    "episodic_best",  # best cosine of the query against the buffer (an in-RAM probe)
    "semantic_best",  # score of the top semantic hit (the probe's index search)
    "semantic_size",  # log10(1 + entries) / 7
    "router_entropy",  # mean router entropy over the prompt, / ln E
    "prompt_nll",  # mean NLL of the prompt's tokens under the LM, / ln V: familiarity
)
MANIFEST = "manifest.json"
FORMAT = "hmst-system"
VERSION = 1
COMPONENTS = (
    "model",
    "retriever",
    "semantic_memory",
    "episodic_memory",
    "critic",
    "early_exit",
    "controller",
)


@dataclass
class EngineConfig:
    top_k: int = 3
    """Hits requested from each memory."""
    context_k: int = 3
    """Valid hits (of both memories together, best score first) put in the prompt:
    reading both memories then adds no more context lines than reading one."""
    context_margin: float = 0.1
    """...and only hits scoring within this of the best one."""
    critic_threshold: float = 0.5
    """Abstain when verification is on and the critic scores the answer below this."""
    max_new_tokens: int = 16
    temperature: float = 0.0
    stop: tuple[str, ...] = ("\n",)
    abstain_text: str = ABSTAIN
    expert_bias_strength: float = 0.0
    """Routing bias = strength * log(E * expert_weights); 0 leaves routing alone."""
    decision_threshold: float = 0.5
    """A controller decision is taken when its probability exceeds this (0.5: the
    deterministic policy PPO evaluates)."""
    fixed_decisions: dict = field(
        default_factory=lambda: dict(
            early_exit=False, episodic=True, semantic=True, verification=True
        )
    )
    """What a `policy="fixed"` engine does on every query."""
    prompt_format: str = "qa"
    """"qa": Context:/Question:/Answer: lines (hmst.qa); "plain": evidence lines, then
    the query as it is (for a model trained on running text)."""
    remember_interactions: bool = False
    """Write every (question, answer) into episodic memory after answering."""
    episodic_max_entries: int = 64

    def __post_init__(self):
        self.stop = tuple(self.stop)
        if self.prompt_format not in ("qa", "plain"):
            raise ValueError(
                f"prompt_format must be qa or plain, not {self.prompt_format!r}"
            )
        unknown = set(self.fixed_decisions) - set(DECISIONS)
        if unknown:
            raise ValueError(f"unknown decisions {sorted(unknown)}; known: {DECISIONS}")


@dataclass
class MemoryHit:
    source: str  # "episodic" | "semantic"
    id: int
    score: float
    text: str
    valid: bool  # score >= the retriever's floor for this memory's size
    used: bool = False  # put in the prompt (valid, within context_margin of the best,
    # among the best context_k)


@dataclass
class QueryResult:
    query: str
    answer: str
    abstained: bool
    confidence: float
    """P(the returned output is right): the critic's score when it verified, else
    the LM's probability of its answer's first token."""
    raw_answer: str
    lm_confidence: float
    """The LM's probability of its answer's first token."""
    decisions: dict
    decision_probs: dict
    decision_source: (
        str  # "controller" | "fixed" | "forced" | mixed, e.g. "controller+forced"
    )
    expert_weights: list[float] | None
    hits: list[MemoryHit]
    critic: dict | None
    prompt_tokens: int
    new_tokens: int
    blocks_per_token: float
    exit_layers: list[int]
    latency_s: float
    timings: dict
    features: dict

    def to_dict(self) -> dict:
        return asdict(self)


class HMSTInferenceEngine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        retriever=None,
        semantic=None,
        episodic=None,
        critic=None,
        early_exit=None,
        controller=None,
        config: EngineConfig | None = None,
        policy: str = "controller",
        observe: str = "off",
    ):
        """`critic` = (CriticModel, tokenizer); `controller` = (StateSummaryEncoder,
        MetaController); `early_exit` = EarlyExitHeads. `policy` "controller" needs a
        controller; "fixed" uses `config.fixed_decisions`."""
        if policy not in ("controller", "fixed"):
            raise ValueError(f"policy must be controller or fixed, not {policy!r}")
        if policy == "controller" and controller is None:
            raise ValueError(
                "no meta-controller: train one with `python -m hmst.training.rl_train "
                "--checkpoint DIR`, or use policy='fixed'"
            )
        if controller is not None and controller[0].num_features != len(FEATURES):
            raise ValueError(
                f"the controller reads {controller[0].num_features} state features, "
                f"this engine computes {len(FEATURES)} ({', '.join(FEATURES)}): "
                "retrain it with python -m hmst.training.rl_train --checkpoint SYSTEM "
                "--episodes 20000"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.retriever = retriever.eval() if retriever is not None else None
        self.semantic, self.episodic = semantic, episodic
        self.critic = critic
        self.early_exit = early_exit
        self.controller = controller
        self.config = config or EngineConfig()
        self.policy = policy
        self.observe = check_mode(observe)
        self.observers = ObserverRegistry()
        if (semantic is not None or episodic is not None) and retriever is None:
            raise ValueError("memories need a retriever to embed queries")
        self._device = model.embed.weight.device
        self.manifest_extra: dict = {}
        """The `extra` of the manifest this engine was loaded from (build stats, the
        QA world's parameters)."""

    # -- memories --------------------------------------------------------------

    def _embed(self, texts: list[str], kind: str) -> torch.Tensor:
        return self.retriever.encode(self.model, self.tokenizer, texts, kind)

    def remember(self, text: str, metadata: dict | None = None) -> int:
        """Put one recent interaction (a sentence of the conversation) in episodic
        memory."""
        if self.episodic is None:
            raise ValueError("this engine has no episodic memory")
        if not text.strip():
            raise ValueError("empty text")
        ids = self.tokenizer.encode(text)
        # the buffer's key is the mean of the rows given: one sentence vector per token
        key = self._embed([text], "doc").expand(len(ids), -1)
        return self.episodic.add(ids, key, {"text": text, **(metadata or {})})

    def add_knowledge(self, texts: list[str], metadata=None, batch_size: int = 256):
        """Store sentences in semantic memory (embedded with the retriever's key
        projection). Returns their ids."""
        if self.semantic is None:
            raise ValueError("this engine has no semantic memory")
        ids = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            meta = metadata[i : i + batch_size] if metadata is not None else None
            emb = self._embed(chunk, "doc").numpy()
            ids.extend(self.semantic.add_batch(emb, chunk, meta).tolist())
        return ids

    def clear_episodic(self) -> None:
        if self.episodic is not None:
            self.episodic.remove([e.id for e in self.episodic.entries()])

    # -- the query pipeline ----------------------------------------------------

    def _prompt(self, query: str, evidence: list[str]) -> list[int]:
        if self.config.prompt_format == "qa":
            text = format_prompt(query, evidence)
        else:
            text = "\n".join([*evidence, query.strip()])
        ids = self.tokenizer.encode(text)
        limit = self.model.config.max_seq_len - self.config.max_new_tokens
        if len(ids) > limit:  # keep the question: drop evidence from the front
            ids = ids[-limit:]
        return ids

    @torch.no_grad()
    def _probe(self, query: str):
        """One forward of the bare prompt: LM confidence features, the retriever's
        query features, the mean router distribution (the controller's expert target),
        and the prompt's KV cache with its last logits, which generation reuses when
        the prompt stays the bare one (no evidence)."""
        ids = self._prompt(query, [])
        x = torch.tensor([ids], device=self._device)
        room = min(len(ids) + self.config.max_new_tokens, self.model.config.max_seq_len)
        caches = self.model.allocate_kv_cache(1, room)
        out = self.model(x, kv_caches=caches, return_hidden=True)
        probs = out["logits"][0, -1].float().softmax(-1)
        top2 = probs.topk(2).values
        V, E = probs.numel(), self.model.config.n_experts
        ent = -(probs * probs.clamp_min(1e-12).log()).sum() / math.log(V)
        emb, hidden = self.model.embed(x), out["hidden_states"]
        qfeat = pool_features(emb, hidden)[0].cpu()
        rfeat = None
        if self.retriever is not None:
            rfeat = self.retriever.pool(x, emb, hidden)[0].cpu()
        r_ent = out.get("router_entropy")
        # How familiar the query is to the LM (free: the prefill's logits). Text seen
        # in pretraining (a known person's name) reads at low NLL; a name the LM never
        # saw reads high even when its first answer token is confidently (wrongly) set.
        nll = 0.0
        if len(ids) > 1:
            nll = float(F.cross_entropy(out["logits"][0, :-1].float(), x[0, 1:]))
        feats = dict(
            max_prob=float(top2[0]),
            entropy=float(ent),
            margin=float(top2[0] - top2[1]),
            query_len=len(ids) / self.model.config.max_seq_len,
            router_entropy=(
                float(r_ent.mean()) / math.log(E) if r_ent is not None else 0.0
            ),
            prompt_nll=nll / math.log(V),
        )
        router = out["router_probs"].float().mean(0).cpu()
        return ids, qfeat, rfeat, feats, router, (caches, out["logits"][:, -1])

    @torch.no_grad()
    def state_features(
        self, query: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
        """(query features (2D,), state features (len(FEATURES),), named features,
        probe extras). Public so the RL environment computes exactly what the engine
        does."""
        ids, qfeat, rfeat, feats, router, prefilled = self._probe(query)
        q_vec = None
        if rfeat is not None:
            q_vec = self.retriever.embed_features(rfeat[None], "query")[0].detach()
        ep = self.episodic
        feats["episodic_fill"] = len(ep) / ep.max_entries if ep is not None else 0.0
        best = 0.0
        if ep is not None and len(ep) and q_vec is not None:
            keys = torch.stack([e.key_N for e in ep.entries()])
            best = float(F.cosine_similarity(keys, q_vec[None], dim=1).max())
        feats["episodic_best"] = best
        feats["semantic_best"], semantic = 0.0, None
        if self.semantic is not None and len(self.semantic) and q_vec is not None:
            # top_k, not 1: a semantic read reuses this search
            semantic = self.semantic.search(q_vec.numpy()[None], self.config.top_k)[0]
            if len(semantic.scores):
                feats["semantic_best"] = float(semantic.scores[0])
        feats["semantic_size"] = (
            math.log10(1 + len(self.semantic)) / 7 if self.semantic is not None else 0.0
        )
        vec = torch.tensor([feats[k] for k in FEATURES], dtype=torch.float32)
        extras = dict(
            ids=ids, q_vec=q_vec, router=router, prefilled=prefilled, semantic=semantic
        )
        return qfeat, vec, feats, extras

    @torch.no_grad()
    def decide(self, qfeat, state_vec, forced: dict | None = None):
        """(decisions {name: bool}, probabilities {name: float}, expert weights,
        source)."""
        forced = dict(forced or {})
        unknown = set(forced) - set(DECISIONS)
        if unknown:
            raise ValueError(f"unknown decisions {sorted(unknown)}; known: {DECISIONS}")
        probs, expert_w = {}, None
        if self.policy == "controller":
            encoder, controller = self.controller
            out = controller(
                qfeat[None].to(_dev(controller)),
                encoder(state_vec[None].to(_dev(encoder))),
            )
            probs = {k: float(out[k][0]) for k in DECISIONS}
            probs["uncertainty"] = float(out["uncertainty"][0])
            expert_w = out["expert_weights"][0].float().cpu()
            chosen = {k: probs[k] > self.config.decision_threshold for k in DECISIONS}
            source = "controller"
        else:
            chosen = {
                k: bool(self.config.fixed_decisions.get(k, False)) for k in DECISIONS
            }
            source = "fixed"
        if forced:
            chosen.update({k: bool(v) for k, v in forced.items()})
            source = f"{source}+forced" if len(forced) < len(DECISIONS) else "forced"
        if self.early_exit is None:
            chosen["early_exit"] = False
        if self.critic is None:
            chosen["verification"] = False
        if self.episodic is None:
            chosen["episodic"] = False
        if self.semantic is None:
            chosen["semantic"] = False
        return chosen, probs, expert_w, source

    def _retrieve(self, source: str, probe: dict, emitter) -> list[MemoryHit]:
        memory = self.semantic if source == "semantic" else self.episodic
        k, floor = self.config.top_k, self.retriever.config.floor(len(memory))
        q_vec = probe["q_vec"]
        if source == "semantic":
            res = probe["semantic"]  # the probe's search (top_k)
            if res is None:
                res = self.semantic.search(q_vec.numpy()[None], k)[0]
            hits = [
                MemoryHit("semantic", int(i), float(s), t, float(s) >= floor)
                for i, s, t in zip(res.ids, res.scores, res.texts)
            ]
        else:
            hits = [
                MemoryHit(
                    "episodic",
                    h.id,
                    h.score,
                    h.metadata.get("text", ""),
                    h.score >= floor,
                )
                for h in self.episodic.retrieve(q_vec, k)
            ]
        if emitter is not None:
            emitter.emit(
                "memory_retrieval",
                dict(
                    source=source,
                    requested=k,
                    returned=len(hits),
                    valid=sum(h.valid for h in hits),
                    min_score=floor,
                    ids=[h.id for h in hits],
                    scores=[h.score for h in hits],
                    texts=[h.text for h in hits],
                ),
            )
        return hits

    def _expert_bias(self, expert_w):
        s = self.config.expert_bias_strength
        if not s or expert_w is None:
            return None
        E = expert_w.numel()
        return (s * torch.log(E * expert_w.clamp_min(1e-6))).to(self._device)

    @torch.no_grad()
    def _generate(self, ids, early_exit: bool, expert_bias, emitter, prefilled=None):
        """(token ids, exit layer per generated token, first-token probability).
        `prefilled`: (caches, last logits) of `ids` from the probe."""
        n_max = self.config.max_new_tokens
        L = self.model.config.n_layers
        eos = self.tokenizer.eos_id
        toks, exits, first_p = [], [], 1.0
        text_so_far = ""
        if early_exit:
            from hmst.models.early_exit import decode_step, prefill

            if prefilled is None:
                x = torch.tensor([ids], device=self._device)
                caches = self.model.allocate_kv_cache(1, len(ids) + n_max)
                prefilled = caches, prefill(self.model, x, caches)
            caches, logits = prefilled
            layer = L - 1
            for step in range(n_max):
                p = logits.float().softmax(-1)[0]
                tok = int(p.argmax())
                if step == 0:
                    first_p = float(p[tok])
                if tok == eos:
                    break
                toks.append(tok)
                exits.append(layer)
                if emitter is not None:
                    summary = logit_summary(logits[0], None, tok)
                    emitter.emit("step", {"step": step, "row": 0, **summary})
                    if layer < L - 1:
                        emitter.emit("early_exit", step, layer)
                text_so_far = self.tokenizer.decode(toks)
                if any(s in text_so_far for s in self.config.stop) or step == n_max - 1:
                    break
                logits, layer = decode_step(
                    self.model, self.early_exit,
                    torch.tensor([tok], device=self._device), caches, len(ids) + step,
                )  # fmt: skip
            return toks, exits, first_p
        params = SamplingParams(
            max_new_tokens=n_max, temperature=self.config.temperature
        )
        first: list[torch.Tensor] = []

        def forward(*args):  # fast_logits, keeping the prefill's logits
            logits = fast_logits(*args)
            if not first:
                first.append(logits)
            return logits

        if prefilled is not None:
            first.append(prefilled[1])
        stream = generate_stream(
            self.model, [ids], params, eos, forward, expert_bias, emitter, prefilled
        )
        try:
            for step, nxt in enumerate(stream):
                tok = int(nxt[0])
                if step == 0:
                    first_p = float(first[0][0].float().softmax(-1)[tok])
                if tok == eos:
                    break
                toks.append(tok)
                exits.append(L - 1)
                if any(s in self.tokenizer.decode(toks) for s in self.config.stop):
                    break
        finally:
            stream.close()
        return toks, exits, first_p

    def _cut(self, text: str) -> str:
        for s in self.config.stop:
            if s in text:
                text = text[: text.index(s)]
        return text.strip()

    def answer(
        self, query: str, decisions: dict | None = None, observe: str | None = None
    ) -> QueryResult:
        """Answer one query. `decisions` forces any of early_exit / episodic /
        semantic / verification (the rest come from the policy)."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("empty query")
        emitter = self.observers.emitter(observe or self.observe)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        def clock(name, t0):
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            if emitter is not None and emitter.diagnostic:
                emitter.emit("timing", name, timings[name])

        t0 = time.perf_counter()
        qfeat, state_vec, feats, probe = self.state_features(query)
        clock("probe", t0)
        if emitter is not None:
            emitter.emit(
                "generation_begin",
                dict(
                    prompts=[probe["ids"]],
                    params=dict(
                        query=query,
                        engine=True,
                        max_new_tokens=self.config.max_new_tokens,
                        temperature=self.config.temperature,
                    ),
                    mode=emitter.mode,
                ),
            )
        t0 = time.perf_counter()
        chosen, probs, expert_w, source = self.decide(qfeat, state_vec, decisions)
        clock("controller", t0)
        if emitter is not None:
            emitter.emit(
                "controller_decision",
                dict(
                    query=query,
                    decisions=chosen,
                    probabilities=probs,
                    source=source,
                    features=feats,
                    expert_weights=expert_w.tolist() if expert_w is not None else None,
                ),
            )
        hits: list[MemoryHit] = []
        for src in ("episodic", "semantic"):
            if chosen[src]:
                t0 = time.perf_counter()
                hits += self._retrieve(src, probe, emitter)
                clock(f"{src}_memory", t0)
        # context: the best `context_k` valid hits of both memories, best first, and
        # only those within `context_margin` of the best (a near-namesake's fact is a
        # distractor the reader can fall for)
        ranked = sorted((h for h in hits if h.valid), key=lambda h: -h.score)
        floor = ranked[0].score - self.config.context_margin if ranked else 0.0
        ranked = [h for h in ranked if h.score >= floor]
        evidence = list(dict.fromkeys(h.text for h in ranked))[: self.config.context_k]
        for h in hits:
            h.used = h.text in evidence
        ids = self._prompt(query, evidence) if evidence else probe["ids"]
        bias = self._expert_bias(expert_w)
        t0 = time.perf_counter()
        inner = _Nested(emitter) if emitter is not None else None
        # the bare prompt already sits in the probe's KV cache: decode from there
        # (an observed query runs its own prefill, so the trace has its routing)
        reuse = not evidence and bias is None and inner is None
        toks, exits, first_p = self._generate(
            ids,
            chosen["early_exit"],
            bias,
            inner,
            probe["prefilled"] if reuse else None,
        )
        clock("generate", t0)
        raw = self._cut(self.tokenizer.decode(toks))
        answer, abstained, confidence, verdict = raw, False, first_p, None
        if chosen["verification"]:
            from hmst.models.critic import encode_example, score_triples

            t0 = time.perf_counter()
            critic_model, critic_tok = self.critic
            triple = (query, " ".join(evidence), raw)
            score = float(score_triples(critic_model, critic_tok, [triple])[0][0])
            n_critic = len(encode_example(critic_tok, *triple, critic_model.config)[0])
            clock("critic", t0)
            abstained = score < self.config.critic_threshold or not raw
            answer = self.config.abstain_text if abstained else raw
            confidence = 1.0 - score if abstained else score
            verdict = dict(
                score=score,
                threshold=self.config.critic_threshold,
                action="abstain" if abstained else "accept",
                evidence_used=len(evidence),
                tokens=n_critic,
            )
            if emitter is not None:
                emitter.emit("critic_verdict", dict(verdict))
        if (
            self.config.remember_interactions
            and self.episodic is not None
            and not abstained
        ):
            self.remember(f"Question: {query.strip()} Answer: {answer}")
        L = self.model.config.n_layers
        if emitter is not None:
            emitter.emit(
                "generation_end",
                dict(
                    generated=[toks],
                    finish_reasons=["abstain" if abstained else "answer"],
                    elapsed_s=time.perf_counter() - t_start,
                    failed_observers=list(emitter.failed.values()),
                    engine=dict(
                        answer=answer,
                        abstained=abstained,
                        prompt_ids=ids,
                        decisions=chosen,
                    ),
                ),
            )
        result = QueryResult(
            query=query,
            answer=answer,
            abstained=abstained,
            confidence=confidence,
            raw_answer=raw,
            lm_confidence=first_p,
            decisions=chosen,
            decision_probs=probs,
            decision_source=source,
            expert_weights=expert_w.tolist() if expert_w is not None else None,
            hits=hits,
            critic=verdict,
            prompt_tokens=len(ids),
            new_tokens=len(toks),
            blocks_per_token=(
                (sum(e + 1 for e in exits) / len(exits)) if exits else float(L)
            ),
            exit_layers=exits,
            latency_s=time.perf_counter() - t_start,
            timings=timings,
            features=feats,
        )
        return result

    def answer_batch(
        self, queries: list[str], decisions: dict | None = None, observe=None
    ):
        """Answer each query in turn (each gets its own decisions and retrievals)."""
        if not queries:
            raise ValueError("no queries")
        return [self.answer(q, decisions, observe) for q in queries]

    # -- persistence -----------------------------------------------------------

    def save_pretrained(self, path: str, extra: dict | None = None) -> None:
        """Write the whole system (see the module docstring) atomically. `extra`
        (JSON) is kept in the manifest; without it, the loaded manifest's is kept."""
        extra = extra if extra is not None else self.manifest_extra
        from hmst.memory.retriever import save_retriever

        def write(tmp):
            save_model_dir(os.path.join(tmp, "model"), self.model, self.tokenizer)
            if self.retriever is not None:
                save_retriever(os.path.join(tmp, "retriever"), self.retriever)
            if self.semantic is not None:
                self.semantic.save(os.path.join(tmp, "semantic_memory"))
            if self.episodic is not None:
                self.episodic.save(os.path.join(tmp, "episodic_memory"))
            if self.critic is not None:
                from hmst.models.critic import save_critic

                save_critic(os.path.join(tmp, "critic"), *self.critic)
            if self.early_exit is not None:
                from hmst.training.early_exit_train import save_heads

                save_heads(os.path.join(tmp, "early_exit"), self.early_exit, self.model)
            if self.controller is not None:
                from hmst.models.meta_controller import save_controller

                enc, ctl = self.controller
                save_controller(os.path.join(tmp, "controller"), enc, ctl, ctl.config)
            write_manifest(tmp, self.config, extra)

        write_dir_atomic(path, write)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str = "cpu",
        policy: str | None = None,
        observe: str = "off",
        config_overrides: dict | None = None,
    ) -> "HMSTInferenceEngine":
        """Load a directory written by `save_pretrained` (or a bare model checkpoint:
        then only the LM, with `policy="fixed"`). `policy` None: "controller" if the
        system has one, else an error naming the missing controller."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such checkpoint directory: {path}")
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):  # a plain model checkpoint
            model, tok, _ = load_pretrained(path, device=device)
            cfg = EngineConfig(prompt_format="plain", **(config_overrides or {}))
            return cls(
                model, tok, config=cfg, policy=policy or "fixed", observe=observe
            )
        manifest = read_manifest(path)
        have = set(manifest["components"])
        cfg_dict = dict(manifest.get("engine_config", {}))
        cfg_dict.update(config_overrides or {})
        cfg = EngineConfig(**cfg_dict)
        policy = policy or "controller"
        if policy == "controller" and "controller" not in have:
            raise ValueError(
                f"{path} has no meta-controller (components: "
                f"{', '.join(sorted(have))}): train one with "
                f"`python -m hmst.training.rl_train --checkpoint {path}` "
                "or load with policy='fixed'"
            )
        model, tok, _ = load_pretrained(os.path.join(path, "model"), device=device)
        parts: dict = {}
        if "retriever" in have:
            from hmst.memory.retriever import load_retriever

            parts["retriever"] = load_retriever(os.path.join(path, "retriever"))
        if "semantic_memory" in have:
            from hmst.memory.semantic import SemanticMemory

            parts["semantic"] = SemanticMemory.load(
                os.path.join(path, "semantic_memory")
            )
        if "episodic_memory" in have:
            from hmst.memory.episodic import EpisodicMemory

            parts["episodic"] = EpisodicMemory.load(
                os.path.join(path, "episodic_memory")
            )
        if "critic" in have:
            from hmst.models.critic import load_critic

            cm, ct, _ = load_critic(os.path.join(path, "critic"), device=device)
            parts["critic"] = (cm, ct)
        if "early_exit" in have:
            from hmst.training.early_exit_train import load_heads

            parts["early_exit"] = load_heads(os.path.join(path, "early_exit"), model)
        if "controller" in have and policy == "controller":
            from hmst.models.meta_controller import load_controller

            enc, ctl, _, _ = load_controller(
                os.path.join(path, "controller"), device=device
            )
            parts["controller"] = (enc.eval(), ctl.eval())
        engine = cls(model, tok, config=cfg, policy=policy, observe=observe, **parts)
        engine.manifest_extra = manifest.get("extra", {})
        return engine


class _Nested:
    """Hands a generation's per-token events (step, routing, timing) to the engine's
    emitter; the engine emits the begin and end of the whole query itself, so one
    trace holds the controller, memory and critic events around the tokens."""

    def __init__(self, outer):
        self.outer, self.mode, self.failed = outer, outer.mode, outer.failed

    @property
    def diagnostic(self) -> bool:
        return self.outer.diagnostic

    def emit(self, event: str, *args) -> None:
        if event not in ("generation_begin", "generation_end"):
            self.outer.emit(event, *args)


def _dev(module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _hash_dir(path: str) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(root, name)
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[os.path.relpath(full, path)] = h.hexdigest()
    return out


def write_manifest(root: str, config: EngineConfig, extra: dict | None = None) -> None:
    components = {
        name: {"path": name, "files": _hash_dir(os.path.join(root, name))}
        for name in COMPONENTS
        if os.path.isdir(os.path.join(root, name))
    }
    doc = dict(
        format=FORMAT,
        version=VERSION,
        components=components,
        engine_config=asdict(config),
        extra=extra or {},
    )
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(doc, f, indent=1)


def add_component(path: str, name: str) -> None:
    """Record a component written into a saved system after the fact (rl_train
    writes `controller/`): the manifest is rewritten with its file hashes, atomically
    (temp file + rename)."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; known: {COMPONENTS}")
    doc = read_manifest(path, verify=False)  # `name` itself has just changed
    doc["components"][name] = {
        "path": name,
        "files": _hash_dir(os.path.join(path, name)),
    }
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))


def read_manifest(path: str, verify: bool = True) -> dict:
    """The manifest, checked: known format, every listed component present and (with
    `verify`) every file's sha256 as written."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {MANIFEST} in {path}: {e}") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(f"{path}/{MANIFEST}: not an {FORMAT} v{VERSION} manifest")
    for name, comp in doc["components"].items():
        if name not in COMPONENTS:
            raise ValueError(f"{path}/{MANIFEST}: unknown component {name!r}")
        if not verify:
            continue
        got = _hash_dir(os.path.join(path, comp["path"]))
        for rel, digest in comp["files"].items():
            if got.get(rel) != digest:
                raise ValueError(
                    f"{path}/{name}/{rel} is missing or differs from the manifest"
                )
    return doc


__all__ = [
    "HMSTInferenceEngine",
    "EngineConfig",
    "QueryResult",
    "MemoryHit",
    "DECISIONS",
    "FEATURES",
]
