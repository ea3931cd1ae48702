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

import numpy as np
import numpy.typing as npt

from sia_edge.files import atomic_output, commit_output
from sia_edge.prompts import Prompt, stable_seed
from sia_edge.value_format import CandidateHeadMeta

__all__ = ["CandidateFit", "collect_states", "fit_candidate_head", "load_states"]


def collect_states(
    engine: object,
    prompts: Sequence[Prompt],
    out: str | os.PathLike[str],
    *,
    k: int = 10,
    horizon: int = 16,
    w: float = 3.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write the states of ``prompts`` (see the module docstring) to ``out`` (.npz, atomic).
    ``engine`` is a ``SteeringEngine`` with a value model. Returns the number of states."""
    from sia_edge import kernels
    from sia_edge.engine import SteeringEngine
    from sia_edge.llama_backend import LlamaContext

    assert isinstance(engine, SteeringEngine)
    if engine.value is None:
        raise ValueError("collecting candidate-head data needs a value model (its scalar head is the teacher)")
    vm = engine.value
    rows: dict[str, list[npt.NDArray[np.generic]]] = {n: [] for n in ("hidden", "ids", "logits", "values")}
    meta: dict[str, list[int]] = {"prompt": [], "step": [], "steered": []}
    base = LlamaContext(engine.base, n_ctx=engine.n_ctx, n_threads=engine.n_threads)
    scorer = vm.new_scorer(n_ctx=engine.n_ctx, k_max=k)
    scorer.want_prefix_hidden = True
    topk = kernels.TopK(k)
    try:
        for i, item in enumerate(prompts):
            tokens = engine.encode_prompt(item.messages())
            steered = i % 2 == 0
            rng = kernels.Rng(stable_seed("candidate-head", seed, i))
            base.clear()
            scorer.reset()
            base.decode(tokens, 0)
            for step in range(horizon):
                logits = base.logits(-1)
                kernels.junction_stats(logits, topk)
                values = scorer.score(tokens, topk.ids)
                hidden = scorer.prefix_hidden
                assert hidden is not None
                rows["hidden"].append(hidden.astype(np.float32))
                rows["ids"].append(topk.ids.copy())
                rows["logits"].append(topk.logits.copy())
                rows["values"].append(values.copy())
                meta["prompt"].append(i)
                meta["step"].append(step)
                meta["steered"].append(int(steered))
                chosen = kernels.steer_topk_inplace(logits, topk, values if steered else None, w=w, temperature=1.0,
                                                    rng=rng)
                scorer.commit(chosen)
                token = int(topk.ids[chosen])
                if engine.base.is_eog(token):
                    break
                tokens.append(token)
                base.decode([token], len(tokens) - 1)
            if progress is not None:
                progress(i + 1, len(prompts))
    finally:
        scorer.close()
        base.close()
    arrays = {n: np.stack(v) for n, v in rows.items()}
    arrays.update({n: np.asarray(v, dtype=np.int32) for n, v in meta.items()})
    arrays["harmful"] = np.asarray([bool(p.harmful) for p in prompts])
    info = {"value_model": vm.name, "base_model": engine.base.path.name, "k": k, "horizon": horizon, "w": w,
            "seed": seed, "prompts": len(prompts)}
    tmp = atomic_output(out)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, info=np.asarray(json.dumps(info)), **arrays)  # type: ignore[arg-type]
        commit_output(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(arrays["ids"])


def load_states(path: str | os.PathLike[str]) -> tuple[dict[str, npt.NDArray[np.generic]], dict[str, object]]:
    with np.load(path) as z:
        arrays = {n: z[n] for n in z.files if n != "info"}
        info = json.loads(str(z["info"]))
    return arrays, info


@dataclass(frozen=True)
class CandidateFit:
    head: CandidateHeadMeta
    report: dict[str, float]


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
    log: Callable[[str], None] = print,
) -> CandidateFit:
    """Fit Q(s, c) = V(s) + b[c] + U[c] . (A h_s + a) to the scalar head's values, with
    U = E P + D and b = E beta + delta (E: the backbone's input embeddings, so tokens never seen
    as candidates still get a head from their embedding; D and delta: per-token corrections).
    The loss is the squared error of each state's values about their mean (steering is blind to
    a shift shared by all candidates) plus a tenth of the plain squared error."""
    import torch

    torch.manual_seed(seed)
    hidden = torch.from_numpy(np.asarray(states["hidden"], dtype=np.float32))
    ids = torch.from_numpy(np.asarray(states["ids"], dtype=np.int64))
    target = torch.from_numpy(np.asarray(states["values"], dtype=np.float32))
    prompt = np.asarray(states["prompt"])
    wt = torch.from_numpy(np.asarray(head_weight, dtype=np.float32))
    v_state = hidden @ wt + float(head_bias)
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
    params = [proj, proj_bias, p_emb, beta, delta_u, delta_b]
    opt = torch.optim.Adam(params, lr=lr)

    def q(rows: torch.Tensor) -> torch.Tensor:
        c = ids[rows]  # (n, k)
        ec = e[c]  # (n, k, d)
        u = ec @ p_emb + delta_u[c]  # (n, k, r)
        b = ec @ beta + delta_b[c]
        g = hidden[rows] @ proj.T + proj_bias  # (n, r)
        return v_state[rows, None] + b + (u * g[:, None, :]).sum(-1)

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
    head = CandidateHeadMeta(proj=proj.detach().numpy(), proj_bias=proj_bias.detach().numpy(), table=table,
                             token_bias=token_bias)
    t_val = target[va].numpy()
    z_val = np.asarray(states["logits"])[va.numpy()]
    tc = t_val - t_val.mean(1, keepdims=True)
    pc = pred_val - pred_val.mean(1, keepdims=True)
    report = {"states_train": len(tr), "states_heldout": len(va), "heldout_loss": best,
              "r2_within_state": float(1 - ((tc - pc) ** 2).sum() / (tc ** 2).sum()),
              **steering_agreement(z_val, t_val, pred_val, w)}
    return CandidateFit(head=head, report=report)


def token_embeddings(gguf_path: str | os.PathLike[str]) -> npt.NDArray[np.float32]:
    """The backbone's input embeddings (n_vocab x d, float32) from its GGUF."""
    from sia_edge.gguf_io import read_gguf_tensor_infos
    from sia_edge.train.export import read_gguf_tensor

    infos = read_gguf_tensor_infos(gguf_path)
    if "token_embd.weight" not in infos:
        raise ValueError(f"{gguf_path}: no token_embd.weight tensor")
    return read_gguf_tensor(gguf_path, infos["token_embd.weight"])


_ASSET_KEYS = ("proj", "proj_bias", "table", "token_bias")


def save_head_asset(head: CandidateHeadMeta, path: str | os.PathLike[str],
                    report: dict[str, float] | None = None) -> None:
    """The head as a safetensors file (what a preset ships; ``load_head_asset`` reads it). Atomic."""
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(getattr(head, k)) for k in _ASSET_KEYS},
                metadata={"report": json.dumps(report or {})})
    tmp = atomic_output(path)
    try:
        tmp.write_bytes(blob)
        commit_output(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_head_asset(path: str | os.PathLike[str]) -> CandidateHeadMeta:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        t = load_file(str(path))
        return CandidateHeadMeta(**{k: t[k] for k in _ASSET_KEYS})
    except (SafetensorError, OSError, KeyError) as exc:
        raise ValueError(f"{path}: not a candidate head ({exc}); re-run tools/train_candidate_head.py fit") from None
