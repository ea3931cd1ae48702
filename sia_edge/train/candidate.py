"""The candidate head: distilled from the scalar head, stored beside it in the value GGUF.

The scalar head scores a candidate c after a prefix s by decoding s + c in the value model (one
branch row per candidate). The candidate head scores all k candidates from the one hidden state
of the prefix (value_format.py has the formula), so a junction costs the value model only its
catch-up. It is trained to reproduce the scalar head where it matters, at the states steering
visits:

1. ``collect_states``: answers to training prompts within the steering horizon, half steered
   (w, every step) and half not; at every step the base model's top-k, the scalar head's values
   of those k candidates and the value model's hidden state of the prefix.
2. ``fit_candidate_head``: the head's parameters by least squares on those values (PyTorch),
   with a held-out share of the prompts to report how closely it steers like the scalar head.

docs/TRAINING.md ("The candidate head") has the commands; tools/train_candidate_head.py runs both.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sia_edge.files import atomic_output, commit_output
from sia_edge.prompts import Prompt, stable_seed
from sia_edge.value_format import CandidateHeadMeta, ValueFormatError

__all__ = ["CandidateFit", "HeadFactors", "collect_states", "fit_candidate_head", "install_student_heads",
           "load_states", "make_student_assets"]


def collect_states(
    engine: object,
    prompts: Sequence[Prompt],
    out: str | os.PathLike[str],
    *,
    k: int = 10,
    horizon: int = 16,
    w: float = 3.0,
    seed: int = 0,
    students: Sequence[str | os.PathLike[str]] = (),
    numbers: Sequence[int] | None = None,
    chat: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write the states of ``prompts`` (see the module docstring) to ``out`` (.npz, atomic).
    ``engine`` is a ``SteeringEngine`` with a value model. Returns the number of states.

    ``students``: value GGUFs (a shallower copy of the value model, say) whose hidden state of
    each prefix is recorded too, as ``hidden_student{i}``: a candidate head fitted on a student's
    states scores like the engine's value model at the cost of the student's forward pass.
    ``numbers``: each prompt's place in the whole list when this is one part of it (its seed and
    whether it is steered follow the place, so parts add up to one collection). ``chat``: each
    prompt is a user turn in the base model's chat template; False: text the base model continues
    (a base model's task, as a preset's prompt style says)."""
    from sia_edge import kernels
    from sia_edge.engine import SteeringEngine
    from sia_edge.llama_backend import LlamaContext
    from sia_edge.value_scorer import ValueModel, ValueScorer

    assert isinstance(engine, SteeringEngine)
    if engine.value is None or engine.value.model is None:
        raise ValueError("collecting candidate-head data needs a value model with a scalar head (the teacher)")
    vm = engine.value
    numbers = list(range(len(prompts))) if numbers is None else list(numbers)
    if len(numbers) != len(prompts):
        raise ValueError(f"{len(numbers)} prompt numbers for {len(prompts)} prompts")
    student_keys = [f"hidden_student{i}" for i in range(len(students))]
    rows: dict[str, list[npt.NDArray[np.generic]]] = {
        n: [] for n in ("hidden", "ids", "logits", "values", *student_keys)}
    meta: dict[str, list[int]] = {"prompt": [], "step": [], "steered": [], "prefix_len": []}
    sequences: list[list[int]] = []  # each prompt's tokens and answer: a state's prefix is its first prefix_len
    student_models: list[ValueModel] = []
    student_scorers: list[ValueScorer] = []
    base = LlamaContext(engine.base, n_ctx=engine.n_ctx, n_threads=engine.n_threads)
    scorer = ValueScorer(vm, n_ctx=engine.n_ctx, k_max=k, n_threads=engine.n_threads)
    scorer.want_prefix_hidden = True
    topk = kernels.TopK(k)
    try:
        for p in students:
            student_models.append(ValueModel(p, n_threads=engine.n_threads))
            if student_models[-1].model is None:
                raise ValueError(f"student {Path(p).name} has no layers to record a hidden state with: pass a GGUF "
                                 "with layers (for the base model's own state, a copy of the base GGUF with value "
                                 "keys: train_candidate_head.py student --layers 0)")
            student_scorers.append(ValueScorer(student_models[-1], n_ctx=engine.n_ctx, k_max=k,
                                               n_threads=engine.n_threads))
        for i, item in enumerate(prompts):
            tokens = engine.encode_prompt(item.messages() if chat else item.prompt)
            steered = numbers[i] % 2 == 0
            rng = kernels.Rng(stable_seed("candidate-head", seed, numbers[i]))
            base.clear()
            scorer.reset()
            for st in student_scorers:
                st.reset()
            base.decode(tokens, 0)
            for step in range(horizon):
                logits = base.logits(-1)
                kernels.junction_stats(logits, topk)
                values = scorer.score(tokens, topk.ids)
                hidden = scorer.prefix_hidden
                assert hidden is not None
                rows["hidden"].append(hidden.astype(np.float32))
                for key, st in zip(student_keys, student_scorers, strict=True):
                    rows[key].append(st.hidden_of(tokens).astype(np.float32))
                rows["ids"].append(topk.ids.copy())
                rows["logits"].append(topk.logits.copy())
                rows["values"].append(values.copy())
                meta["prompt"].append(i)
                meta["step"].append(step)
                meta["steered"].append(int(steered))
                meta["prefix_len"].append(len(tokens))
                chosen = kernels.steer_topk_inplace(logits, topk, values if steered else None, w=w, temperature=1.0,
                                                    rng=rng)
                scorer.commit(chosen)
                token = int(topk.ids[chosen])
                if engine.base.is_eog(token):
                    break
                tokens.append(token)
                base.decode([token], len(tokens) - 1)
            sequences.append(tokens)
            if progress is not None:
                progress(i + 1, len(prompts))
    finally:
        for st in student_scorers:
            st.close()
        for m in student_models:
            m.close()
        scorer.close()
        base.close()
    arrays = {n: np.stack(v) for n, v in rows.items()}
    arrays.update({n: np.asarray(v, dtype=np.int32) for n, v in meta.items()})
    arrays["harmful"] = np.asarray([bool(p.harmful) for p in prompts])
    # the token sequences, so a student can be trained on the prefixes themselves (end to end)
    arrays["seq_tokens"] = np.asarray([t for s in sequences for t in s], dtype=np.int32)
    arrays["seq_offsets"] = np.cumsum([0, *map(len, sequences)]).astype(np.int64)
    info = {"value_model": vm.name, "base_model": engine.base.path.name, "k": k, "horizon": horizon, "w": w,
            "seed": seed, "prompt_style": "chat" if chat else "text", "prompts": len(prompts), "students": [Path(p).name for p in students]}
    tmp = atomic_output(out)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, info=np.asarray(json.dumps(info)), **arrays)  # type: ignore[arg-type]
        commit_output(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(arrays["ids"])


def load_states(*paths: str | os.PathLike[str]) -> tuple[dict[str, npt.NDArray[np.generic]], dict[str, object]]:
    """The arrays and settings of one or more files of ``collect_states`` (parts of one
    collection, ``--part``), joined: prompt numbers run on from one file to the next."""
    if not paths:
        raise ValueError("load_states needs at least one file")
    parts: list[dict[str, npt.NDArray[np.generic]]] = []
    info: dict[str, object] = {}
    for path in paths:
        try:
            with np.load(path) as z:
                arrays = {n: z[n] for n in z.files if n != "info"}
                this = json.loads(str(z["info"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a file of collected states ({exc}); re-run "
                             "tools/train_candidate_head.py collect") from None
        same = ("value_model", "base_model", "k", "horizon", "w", "students", "prompt_style")
        this.setdefault("prompt_style", "chat")  # collected before text prompts existed
        if info and any(info.get(k) != this.get(k) for k in same):
            raise ValueError(f"{path} was collected with other settings than {paths[0]} "
                             f"({', '.join(same)} must agree)")
        if info:
            offset = sum(len(p["harmful"]) for p in parts)
            arrays["prompt"] = arrays["prompt"] + offset
            if "seq_offsets" in arrays and "seq_offsets" in parts[-1]:  # they run on too; one leading 0
                arrays["seq_offsets"] = arrays["seq_offsets"][1:] + parts[-1]["seq_offsets"][-1]
            info["prompts"] = int(info["prompts"]) + int(this["prompts"])  # type: ignore[call-overload]
        else:
            info = this
        parts.append(arrays)
    shared = [n for n in parts[0] if all(n in p for p in parts)]  # older files lack the sequences
    joined = {n: np.concatenate([p[n] for p in parts]) for n in shared}
    return joined, info


@dataclass(frozen=True)
class CandidateFit:
    head: CandidateHeadMeta
    report: dict[str, float]
    state_head: tuple[npt.NDArray[np.float32], float] | None = None  # V(s) (weight, bias), if fitted
    factors: HeadFactors | None = None  # the head as the fit made it: what an asset stores


def _steered(z: npt.NDArray[np.float64], v: npt.NDArray[np.float64], w: float) -> npt.NDArray[np.float64]:
    s = z + w * v
    s = s - s.max(axis=1, keepdims=True)
    p: npt.NDArray[np.float64] = np.exp(s)
    out: npt.NDArray[np.float64] = p / p.sum(axis=1, keepdims=True)
    return out


def steering_agreement(z: npt.NDArray[np.floating], v_teacher: npt.NDArray[np.floating],
                       v_student: npt.NDArray[np.floating], w: float) -> dict[str, float]:
    """How closely a head steers like the teacher on the same states: the mean KL divergence of
    the student's steered top-k distribution from the teacher's, the share of states whose most
    likely steered candidate is the same, and that of the mean shift each moves probability."""
    z64, t64, s64 = (np.asarray(a, dtype=np.float64) for a in (z, v_teacher, v_student))
    pt, ps, p0 = _steered(z64, t64, w), _steered(z64, s64, w), _steered(z64, 0 * t64, w)
    kl = float(np.mean(np.sum(pt * (np.log(pt + 1e-30) - np.log(ps + 1e-30)), axis=1)))
    kl_off = float(np.mean(np.sum(pt * (np.log(pt + 1e-30) - np.log(p0 + 1e-30)), axis=1)))
    top = float(np.mean(pt.argmax(axis=1) == ps.argmax(axis=1)))
    top_off = float(np.mean(pt.argmax(axis=1) == p0.argmax(axis=1)))
    return {"kl_teacher_student": kl, "kl_teacher_unsteered": kl_off, "top1_agreement": top,
            "top1_agreement_unsteered": top_off}


def fit_candidate_head(
    states: dict[str, npt.NDArray[np.generic]],
    *,
    head_weight: npt.NDArray[np.float32],
    head_bias: float,
    embeddings: npt.NDArray[np.float32],
    rank: int = 32,
    epochs: int = 12,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    w: float = 3.0,
    val_share: float = 0.1,
    seed: int = 0,
    fit_state_value: bool = False,
    log: Callable[[str], None] = print,
) -> CandidateFit:
    """Fit Q(s, c) = V(s) + b[c] + U[c] . (A h_s + a) to the scalar head's values, with
    U = E P + D and b = E beta + delta (E: the backbone's input embeddings, so tokens never seen
    as candidates still get a head from their embedding; D and delta: per-token corrections).
    The loss is the squared error of each state's values about their mean (steering is blind to
    a shift shared by all candidates) plus a tenth of the plain squared error.

    ``fit_state_value``: the hidden states are not those the scalar head (``head_weight``,
    ``head_bias``) reads -- a shallower student's -- so V(s) is fitted too (to the mean of each
    state's values), and returned as the fit's ``state_head``."""
    import torch

    torch.manual_seed(seed)
    hidden = torch.from_numpy(np.asarray(states["hidden"], dtype=np.float32))
    ids = torch.from_numpy(np.asarray(states["ids"], dtype=np.int64))
    target = torch.from_numpy(np.asarray(states["values"], dtype=np.float32))
    prompt = np.asarray(states["prompt"])
    wt = torch.nn.Parameter(torch.from_numpy(np.array(head_weight, dtype=np.float32)),
                            requires_grad=fit_state_value)
    bias = torch.nn.Parameter(torch.tensor(float(head_bias)), requires_grad=fit_state_value)
    if fit_state_value:
        with torch.no_grad():
            wt.zero_()
            bias.fill_(float(target.mean()))
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    n_vocab, d = emb.shape
    rng = np.random.default_rng(seed)
    prompts = np.unique(prompt)
    val_prompts = set(rng.choice(prompts, size=max(1, int(len(prompts) * val_share)), replace=False).tolist())
    is_val = torch.from_numpy(np.isin(prompt, list(val_prompts)))
    tr, va = torch.nonzero(~is_val).squeeze(1), torch.nonzero(is_val).squeeze(1)
    # embeddings are on the model's input scale: normalise so the projections start balanced
    emb_scale = float(emb.norm(dim=1).mean())
    e = emb / emb_scale

    proj = torch.nn.Parameter(torch.randn(rank, d) / math.sqrt(d))
    proj_bias = torch.nn.Parameter(torch.zeros(rank))
    p_emb = torch.nn.Parameter(torch.randn(d, rank) * 0.01)
    beta = torch.nn.Parameter(torch.zeros(d))
    delta_u = torch.nn.Parameter(torch.zeros(n_vocab, rank))
    delta_b = torch.nn.Parameter(torch.zeros(n_vocab))
    params = [proj, proj_bias, p_emb, beta, delta_u, delta_b] + ([wt, bias] if fit_state_value else [])
    opt = torch.optim.Adam(params, lr=lr)

    def q(rows: torch.Tensor) -> torch.Tensor:
        c = ids[rows]  # (n, k)
        ec = e[c]  # (n, k, d)
        u = ec @ p_emb + delta_u[c]  # (n, k, r)
        b = ec @ beta + delta_b[c]
        g = hidden[rows] @ proj.T + proj_bias  # (n, r)
        v_state = hidden[rows] @ wt + bias
        return v_state[:, None] + b + (u * g[:, None, :]).sum(-1)

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        pred, t = q(rows), target[rows]
        centred = ((pred - pred.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))).pow(2).mean()
        return centred + 0.1 * (pred - t).pow(2).mean()

    best, best_state, t0 = math.inf, None, time.time()
    batch = 256
    for epoch in range(epochs):
        perm = tr[torch.randperm(len(tr))]
        for j in range(0, len(perm), batch):
            rows = perm[j:j + batch]
            loss = loss_of(rows)
            reg = weight_decay * (delta_u[ids[rows]].pow(2).mean() + delta_b[ids[rows]].pow(2).mean())
            opt.zero_grad()
            (loss + reg).backward()
            opt.step()
        with torch.no_grad():
            val = float(loss_of(va))
        if val < best:
            best, best_state = val, [p.detach().clone() for p in params]
        if epoch % 5 == 0 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}/{epochs}: held-out loss {val:.4f} (best {best:.4f}, {time.time() - t0:.0f} s)")
    assert best_state is not None
    with torch.no_grad():
        for p, v in zip(params, best_state, strict=True):
            p.copy_(v)
        table = (e @ p_emb + delta_u).numpy()
        token_bias = (e @ beta + delta_b).numpy()
        pred_val = q(va).numpy()
        seen = torch.nonzero((delta_u != 0).any(1) | (delta_b != 0)).squeeze(1)  # Adam leaves the others at 0
        factors = HeadFactors(proj=proj.detach().numpy(), proj_bias=proj_bias.detach().numpy(),
                              emb_proj=(p_emb / emb_scale).numpy(), emb_bias=(beta / emb_scale).numpy(),
                              delta_ids=seen.numpy().astype(np.int32), delta_table=delta_u[seen].numpy(),
                              delta_bias=delta_b[seen].numpy(), emb_checksum=embedding_checksum(embeddings))
    head = CandidateHeadMeta(proj=proj.detach().numpy(), proj_bias=proj_bias.detach().numpy(), table=table,
                             token_bias=token_bias)
    t_val = target[va].numpy()
    z_val = np.asarray(states["logits"])[va.numpy()]
    tc = t_val - t_val.mean(1, keepdims=True)
    pc = pred_val - pred_val.mean(1, keepdims=True)
    report = {"states_train": len(tr), "states_heldout": len(va), "heldout_loss": best,
              "r2_within_state": float(1 - ((tc - pc) ** 2).sum() / (tc ** 2).sum()),
              **steering_agreement(z_val, t_val, pred_val, w)}
    state_head = (wt.detach().numpy().copy(), float(bias.detach())) if fit_state_value else None
    return CandidateFit(head=head, report=report, state_head=state_head, factors=factors)


def token_embeddings(gguf_path: str | os.PathLike[str]) -> npt.NDArray[np.float32]:
    """The backbone's input embeddings (n_vocab x d, float32) from its GGUF."""
    from sia_edge.gguf_io import read_gguf_tensor_infos
    from sia_edge.train.export import read_gguf_tensor

    infos = read_gguf_tensor_infos(gguf_path)
    if "token_embd.weight" not in infos:
        raise ValueError(f"{gguf_path}: no token_embd.weight tensor")
    return read_gguf_tensor(gguf_path, infos["token_embd.weight"])


_ASSET_KEYS = ("proj", "proj_bias", "table", "token_bias")
_FACTOR_KEYS = ("proj", "proj_bias", "emb_proj", "emb_bias", "delta_ids", "delta_table", "delta_bias")


@dataclass(frozen=True)
class HeadFactors:
    """A candidate head as the fit makes it: table = E emb_proj + D and token_bias = E emb_bias +
    delta, with E the backbone's input embeddings and D, delta zero but for the tokens the
    training data offered as candidates (``delta_ids``). What a preset ships: for a vocabulary of
    hundreds of thousands of tokens the whole table is tens of megabytes, its factors a few. The
    build multiplies them out against the backbone GGUF's embeddings (``expand``);
    ``emb_checksum`` makes sure they are the embeddings the head was fitted with."""

    proj: npt.NDArray[np.float32]  # (r, d)
    proj_bias: npt.NDArray[np.float32]  # (r,)
    emb_proj: npt.NDArray[np.float32]  # (d_emb, r)
    emb_bias: npt.NDArray[np.float32]  # (d_emb,)
    delta_ids: npt.NDArray[np.int32]  # (m,)
    delta_table: npt.NDArray[np.float32]  # (m, r)
    delta_bias: npt.NDArray[np.float32]  # (m,)
    emb_checksum: float

    def expand(self, embeddings: npt.NDArray[np.float32]) -> CandidateHeadMeta:
        e = np.asarray(embeddings, dtype=np.float32)
        if e.ndim != 2 or e.shape[1] != self.emb_proj.shape[0]:
            raise ValueError(f"the candidate head was fitted on token embeddings of width {self.emb_proj.shape[0]}; "
                             f"these have shape {e.shape}: build it with the backbone it was fitted on")
        got = embedding_checksum(e)
        if not math.isclose(got, self.emb_checksum, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"the candidate head was fitted on other token embeddings (checksum {self.emb_checksum:.6g}, "
                             f"these {got:.6g}): build it with the backbone GGUF it was fitted on")
        if len(self.delta_ids) and (self.delta_ids.min() < 0 or self.delta_ids.max() >= len(e)):
            raise ValueError(f"the candidate head names token ids beyond this vocabulary of {len(e)}")
        table = e @ self.emb_proj
        table[self.delta_ids] += self.delta_table
        token_bias = e @ self.emb_bias
        token_bias[self.delta_ids] += self.delta_bias
        return CandidateHeadMeta(proj=self.proj, proj_bias=self.proj_bias, table=table, token_bias=token_bias)


def embedding_checksum(embeddings: npt.NDArray[np.floating]) -> float:
    """A number that tells one embedding matrix from another (``HeadFactors.emb_checksum``)."""
    e = np.asarray(embeddings, dtype=np.float64)
    weights = np.cos(np.arange(e.shape[0], dtype=np.float64))  # not a plain sum: a permutation changes it
    return float(weights @ e.sum(axis=1))


def save_head_asset(head: CandidateHeadMeta | HeadFactors, path: str | os.PathLike[str],
                    report: dict[str, float] | None = None) -> None:
    """The head as a safetensors file, whole or as its factors (what a preset ships;
    ``load_head_asset`` reads both). Atomic."""
    from safetensors.numpy import save

    meta = {"report": json.dumps(report or {})}
    keys: tuple[str, ...] = _ASSET_KEYS
    if isinstance(head, HeadFactors):
        keys, meta["emb_checksum"] = _FACTOR_KEYS, repr(head.emb_checksum)
    _write_atomic(Path(path), save({k: np.ascontiguousarray(getattr(head, k)) for k in keys}, metadata=meta))


def candidate_asset_of(model_dir: str | os.PathLike[str],
                       backbone: str | os.PathLike[str] | None = None) -> CandidateHeadMeta | None:
    """The candidate head a trained value model's folder ships (``CANDIDATE_FILE``), or None;
    a damaged one is a ``TrainError``. What the builds (merge, export) put into the GGUF.
    ``backbone``: the GGUF whose token embeddings a head shipped as factors is expanded with."""
    from sia_edge.train import TrainError
    from sia_edge.train.meta import CANDIDATE_FILE

    path = Path(model_dir) / CANDIDATE_FILE
    if not path.is_file():
        return None
    try:
        return load_head_asset(path, backbone=backbone)
    except (ValueError, ValueFormatError) as exc:
        raise TrainError(str(exc)) from None


def load_head_asset(path: str | os.PathLike[str],
                    backbone: str | os.PathLike[str] | None = None) -> CandidateHeadMeta:
    """A head written by ``save_head_asset``; one stored as factors needs the ``backbone`` GGUF."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        t = load_file(str(path))
        if "table" in t:
            return CandidateHeadMeta(**{k: t[k] for k in _ASSET_KEYS})
        with safe_open(str(path), "np") as f:
            checksum = float((f.metadata() or {})["emb_checksum"])
        factors = HeadFactors(**{k: t[k] for k in _FACTOR_KEYS}, emb_checksum=checksum)
        if factors.delta_ids.dtype.kind not in "iu":
            raise TypeError(f"delta_ids are {factors.delta_ids.dtype}, not token ids")
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a candidate head ({exc}); re-run tools/train_candidate_head.py fit") from None
    if backbone is None:
        raise ValueError(f"{path}: the candidate head is stored as factors of its backbone's token embeddings; "
                         "building it needs the backbone GGUF")
    try:
        return factors.expand(token_embeddings(backbone))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- a shallower student
def make_student_assets(teacher: str | os.PathLike[str], out: str | os.PathLike[str], layers: int) -> Path:
    """A value model's assets cut to its first ``layers`` decoder layers (the adapter's later
    layers dropped, ``layers`` recorded): the backbone of a student whose candidate head learns
    the teacher's values (``fit_candidate_head`` with ``fit_state_value``, then
    ``install_student_heads``). Its scalar head is the teacher's until then. ``layers`` 0: no
    layers and no adapter at all, the student reads the base model's own hidden state. Each
    file atomic."""
    import re

    from safetensors.numpy import load_file, save

    from sia_edge.train import TrainError
    from sia_edge.train.meta import ADAPTER_FILES, CANDIDATE_FILE, HEAD_FILE, META_FILE, ValueMeta

    src, dst = Path(teacher), Path(out)
    meta = ValueMeta.from_file(src / META_FILE)
    total = meta.layers
    if total is None:
        raise TrainError(f"{src / META_FILE} records no layer count; a student cannot be cut from it")
    if not 0 <= layers < total:
        raise TrainError(f"a student keeps between 0 (the base model's own state) and {(total or 1) - 1} of the "
                         f"teacher's {total} layers, got {layers}")
    adapter = load_file(str(src / ADAPTER_FILES[1]))
    kept = {}
    for name, t in adapter.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m is None:
            raise TrainError(f"{src / ADAPTER_FILES[1]}: tensor {name} belongs to no decoder layer; "
                             "a student cannot be cut from this adapter")
        if int(m.group(1)) < layers:
            kept[name] = t
    meta.layers = layers
    meta.metrics = {}
    meta.steering = {k: v for k, v in meta.steering.items() if k != "value_head"}  # its heads are fitted later
    if not layers:
        meta.lora = {}
    meta.training = {"student_of": src.name, "teacher_layers": total}
    dst.mkdir(parents=True, exist_ok=True)
    _write_atomic(dst / HEAD_FILE, (src / HEAD_FILE).read_bytes())
    if layers:
        _write_atomic(dst / ADAPTER_FILES[0], (src / ADAPTER_FILES[0]).read_bytes())
        _write_atomic(dst / ADAPTER_FILES[1], save(kept))
    else:
        for name in ADAPTER_FILES:
            (dst / name).unlink(missing_ok=True)
    _write_atomic(dst / META_FILE, (meta.to_json() + "\n").encode())
    (dst / CANDIDATE_FILE).unlink(missing_ok=True)  # a head of another depth does not fit
    return dst


def install_student_heads(assets: str | os.PathLike[str], fit: CandidateFit) -> None:
    """Give a student's assets (``make_student_assets``) the heads fitted on its hidden states:
    the candidate head, V(s) as its scalar head, and the candidate head as the recommended one
    (``value_meta.json``'s steering ``value_head``), with the fit's report as metrics."""
    from safetensors.numpy import save

    from sia_edge.train.meta import CANDIDATE_FILE, HEAD_FILE, META_FILE, ValueMeta

    folder = Path(assets)
    if fit.state_head is None:
        raise ValueError("a student's heads come from a fit with fit_state_value=True")
    weight, bias = fit.state_head
    meta = ValueMeta.from_file(folder / META_FILE)
    meta.steering = {**meta.steering, "value_head": "candidate"}
    meta.metrics = {f"candidate_{k}": float(v) for k, v in fit.report.items()}
    save_head_asset(fit.factors or fit.head, folder / CANDIDATE_FILE, report=fit.report)
    _write_atomic(folder / HEAD_FILE, save({"weight": np.asarray(weight, dtype=np.float32).reshape(1, -1),
                                            "bias": np.asarray([bias], dtype=np.float32)}))
    _write_atomic(folder / META_FILE, (meta.to_json() + "\n").encode())


def _write_atomic(path: Path, blob: bytes) -> None:
    tmp = atomic_output(path)
    try:
        tmp.write_bytes(blob)
        commit_output(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
