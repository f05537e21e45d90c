"""Generation traces: one versioned JSONL artifact per generation, written via a sink.

Lines, in order (schema: `trace_schema.json` beside this file):
    {"type": "header", "schema_version", "trace_id", "created_at", "mode", "model",
     "prompts": [[ids]], "params"}          model = config / weights / tokenizer hashes
    {"type": "token", "step", "row", "token_id", "logit_entropy", "sampling_entropy",
     "surprisal", "top1_top2_margin", "topk": [[id, p]], "experts": [[e]] (per layer),
     "gates": [[g]], "router_entropy": [h] (per layer), "overridden": [bool] | null}
    {"type": "event", "event": ..., ...}    controller, memory, critic, early exit,
                                            timing, anomaly
    {"type": "end", "generated": [[ids]], "finish_reasons", "elapsed_s",
     "failed_observers"}

Entropies are in nats. `logit_entropy` is that of the raw next-token distribution,
`sampling_entropy` of the distribution actually sampled from (after penalties,
temperature, top-k, top-p; 0 for greedy). `surprisal` is -log p_raw(token).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid

import torch

from hmst.observe.hooks import Observer

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "trace_schema.json"
)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checkpoint_info(path: str) -> dict:
    """Hashes that identify what produced a trace: config, weights, tokenizer."""
    info = {"checkpoint": os.path.abspath(path)}
    for key, name in (
        ("config_sha256", "config.json"),
        ("weights_sha256", "model.safetensors"),
        ("tokenizer_sha256", "tokenizer.json"),
    ):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            info[key] = sha256_file(f)
    return info


def logit_summary(raw_V, sample_probs_V, token: int, k: int = 5) -> dict:
    """Summary of one row's next-token distribution and the token drawn from it."""
    logp = raw_V.float().log_softmax(-1)
    p = logp.exp()
    top = p.topk(min(max(k, 2), p.numel()))
    if sample_probs_V is None:  # greedy: a point mass
        sampling_entropy = 0.0
    else:
        q = sample_probs_V.float()
        sampling_entropy = float(-(q * q.clamp_min(1e-30).log()).sum())
    return {
        "token_id": int(token),
        "logit_entropy": float(-(p * logp).sum()),
        "sampling_entropy": max(0.0, sampling_entropy),
        "surprisal": float(-logp[token]),
        "top1_top2_margin": float(top.values[0] - top.values[1]),
        "topk": [[int(i), float(v)] for i, v in zip(top.indices[:k], top.values[:k])],
    }


class Sink:
    """Where finished traces go. `write` gets all lines of one trace."""

    def write(self, lines: list[dict]) -> str:
        raise NotImplementedError


class MemorySink(Sink):
    def __init__(self):
        self.traces: list[list[dict]] = []

    def write(self, lines):
        self.traces.append(lines)
        return f"memory:{len(self.traces) - 1}"


class JSONLFileSink(Sink):
    """Appends each trace's lines to one local JSONL file, in one write."""

    def __init__(self, path: str):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"trace directory not found: {parent}")
        self.path = path

    def write(self, lines):
        text = "".join(json.dumps(rec, allow_nan=False) + "\n" for rec in lines)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
        return self.path


class TraceRecorder(Observer):
    """Builds the trace of each observed generation and hands it to the sink."""

    def __init__(self, sink: Sink, model_info: dict | None = None, decode=None):
        """`model_info`: hashes for the header (`checkpoint_info`); `decode`: ids ->
        text, to add each token's text to its record."""
        self.sink, self.model_info, self.decode = sink, model_info or {}, decode
        self.location: str | None = None
        self._reset()

    def _reset(self):
        self.header: dict = {}
        self.tokens: dict[tuple[int, int], dict] = {}
        self.routing: dict[int, list] = {}
        self.events: list[dict] = []
        self.batch = 1

    def on_generation_begin(self, info):
        self._reset()
        self.batch = len(info["prompts"])
        self.header = {
            "type": "header",
            "schema_version": SCHEMA_VERSION,
            "trace_id": uuid.uuid4().hex,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "mode": info.get("mode", "summary"),
            "model": {**self.model_info, **info.get("model", {})},
            "prompts": [list(map(int, p)) for p in info["prompts"]],
            "params": info.get("params", {}),
        }

    def on_routing(self, step, layer, routing):
        # Prefill routes every prompt position: the row's last one produced token 0.
        n = routing["experts"].shape[0]
        if n != self.batch:
            last = torch.arange(1, self.batch + 1) * (n // self.batch) - 1
            routing = {k: None if v is None else v[last] for k, v in routing.items()}
        self.routing.setdefault(step, []).append((layer, routing))

    def on_step(self, record):
        self.tokens[(record["step"], record["row"])] = record

    def _event(self, name, **fields):
        self.events.append({"type": "event", "event": name, **fields})

    def on_controller_decision(self, decision):
        self._event("controller_decision", decision=decision)

    def on_memory_retrieval(self, event):
        self._event("memory_retrieval", **event)

    def on_critic_verdict(self, event):
        self._event("critic_verdict", **event)

    def on_early_exit(self, step, layer):
        self._event("early_exit", step=int(step), layer=int(layer))

    def on_timing(self, component, seconds):
        self._event("timing", component=component, seconds=float(seconds))

    def on_anomaly(self, component, message):
        self._event("anomaly", component=component, message=message)

    def on_generation_end(self, info):
        lines = [self.header]
        for (step, row), rec in sorted(self.tokens.items()):
            layers = [r for _, r in sorted(self.routing.get(step, []), key=_first)]
            rec = {"type": "token", **rec}
            if self.decode is not None:
                rec["text"] = self.decode([rec["token_id"]])
            rec["experts"] = [r["experts"][row].tolist() for r in layers]
            rec["gates"] = [
                [round(g, 6) for g in r["gates"][row].tolist()] for r in layers
            ]
            rec["router_entropy"] = [float(r["entropy"][row]) for r in layers]
            ov = [r["overridden"] for r in layers]
            rec["overridden"] = (
                None if any(o is None for o in ov) else [bool(o[row]) for o in ov]
            )
            lines.append(rec)
        lines.extend(self.events)
        lines.append(
            {
                "type": "end",
                "generated": [list(map(int, g)) for g in info["generated"]],
                "finish_reasons": info.get("finish_reasons", []),
                "elapsed_s": float(info.get("elapsed_s", 0.0)),
                "failed_observers": info.get("failed_observers", []),
                **({"engine": info["engine"]} if "engine" in info else {}),
            }
        )
        self.location = self.sink.write(lines)


def _first(pair):
    return pair[0]


def validate_trace(lines: list[dict]) -> None:
    """Raise jsonschema.ValidationError unless every line fits the schema."""
    import jsonschema

    with open(SCHEMA_PATH, encoding="utf-8") as f:
        schema = json.load(f)
    validator = jsonschema.Draft202012Validator(schema)
    for rec in lines:
        validator.validate(rec)
    if not lines or lines[0]["type"] != "header" or lines[-1]["type"] != "end":
        raise ValueError("a trace starts with a header line and ends with an end line")
