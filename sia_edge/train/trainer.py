"""Training the value model: AdamW on LoRA + head, MSE between the mean response V and the
normalised reward, with an eval split, checkpoints, resume, DDP and a training curve.

The loss of one (prompt, response, R) row is ``(mean_t V_t - (R - mean) / std) ** 2`` over the
response positions t; mean and std come from the training split and are saved with the model
(the engine steers with normalised V, so ``w`` is in reward standard deviations).

Runs on the CPU in one process, or under ``torchrun --nproc-per-node N`` (DistributedDataParallel
with the gloo backend: each process takes every N-th row of the epoch's shuffled order; rank 0
writes every file). The effective batch is ``batch_size * grad_accum * N``.

Checkpoints (``OUT/checkpoints/step-NNNNNNN``) hold the trainable tensors, the AdamW state and the
RNG state as safetensors plus a JSON trainer state, written last; rerunning the same command
resumes from the newest complete one. An interrupt (Ctrl-C) saves a checkpoint first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sia_edge.files import file_sha256
from sia_edge.train import TrainError
from sia_edge.train.data import ValueRow, read_value_rows, split_rows
from sia_edge.train.export import check_backbone_parity, check_exportable, check_exportable_config
from sia_edge.train.model import (
    LoraSettings,
    ValueMeta,
    ValueNet,
    add_lora,
    backbone_fingerprint,
    check_backbone_path,
    is_gguf_file,
    load_backbone,
    response_mean,
    save_value_model,
)

__all__ = ["TrainConfig", "TrainResult", "backbone_for_data", "recorded_base_path", "train"]

CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "training_curve.png"
STATE_FILE = "trainer_state.json"
TRAIN_SUBSET = 256  # rows of the training split scored for the before/after train loss


@dataclass
class TrainConfig:
    data: list[str]
    backbone: str
    out_dir: str
    lora: LoraSettings = field(default_factory=LoraSettings)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    batch_size: int = 4
    grad_accum: int = 4
    epochs: float = 3.0
    max_steps: int | None = None
    max_length: int = 1024
    eval_fraction: float = 0.1
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    head_lr: float | None = None  # defaults to lr
    objective: str | None = None
    progress: bool = True
    restart: bool = False  # discard checkpoints instead of resuming
    n_threads: int | None = None
    layers: int | None = None  # keep the first N decoder layers of the backbone (None: all)

    def validate(self) -> None:
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (self.grad_clip > 0, "grad clip must be > 0"),
            (self.batch_size >= 1, "batch size must be >= 1"),
            (self.grad_accum >= 1, "grad accumulation must be >= 1"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "max steps must be >= 1"),
            (self.max_length >= 8, "max length must be >= 8"),
            (self.eval_every >= 1 and self.save_every >= 1, "eval/save intervals must be >= 1"),
            (self.keep_checkpoints >= 1, "keep at least one checkpoint"),
            (bool(self.data), "no data files given"),
            (self.layers is None or self.layers >= 1, "--layers must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainError(msg)

    def fingerprint(self) -> str:
        """What a checkpoint must agree with to be resumed (not progress/logging knobs)."""
        keys = {k: v for k, v in asdict(self).items()
                if k not in ("out_dir", "progress", "restart", "eval_every", "save_every", "keep_checkpoints",
                             "n_threads", "max_steps", "epochs")}
        keys["data"] = [_file_digest(Path(p)) for p in self.data]
        keys["backbone"] = str(Path(self.backbone).expanduser().resolve())
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    train_loss_before: float
    train_loss_after: float
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    reward_mean: float
    reward_std: float


def _file_digest(path: Path) -> str:
    return file_sha256(path)[:16]


# ----------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _init_dist() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), True)


# ----------------------------------------------------------------------------- batching
@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    target: torch.Tensor  # normalised reward


def _truncate(row: ValueRow, max_length: int) -> tuple[list[int], list[int]] | None:
    if len(row.prompt_ids) >= max_length:
        return None
    return row.prompt_ids, row.response_ids[: max_length - len(row.prompt_ids)]


def _collate(rows: Sequence[tuple[list[int], list[int], float]], pad_id: int) -> _Batch:
    width = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (p, r, _) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        resp[i, len(p):n] = 1.0
    target = torch.tensor([y for _, _, y in rows], dtype=torch.float32)
    return _Batch(ids, attn, resp, target)


def _epoch_order(n: int, seed: int, epoch: int, dist: _Dist) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_rank = math.ceil(n / dist.world)
    order += order[: per_rank * dist.world - n]  # pad so every rank runs the same number of steps
    return order[dist.rank :: dist.world]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _evaluate(net: nn.Module, rows: Sequence[tuple[list[int], list[int], float]], batch_size: int,
              reward_std: float, dist: _Dist, pad_id: int) -> dict[str, float]:
    """MSE (normalised units), MAE (reward units) and R^2 over ``rows`` (sharded over ranks)."""
    was_training = net.training
    net.eval()
    mine = list(rows)[dist.rank :: dist.world]
    sse = sae = sy = syy = 0.0
    for i in range(0, len(mine), batch_size):
        b = _collate(mine[i:i + batch_size], pad_id)
        pred = response_mean(net(b.input_ids, b.attention_mask), b.response_mask).double()
        y = b.target.double()
        sse += float(((pred - y) ** 2).sum())
        sae += float((pred - y).abs().sum())
        sy += float(y.sum())
        syy += float((y * y).sum())
    sse, sae, sy, syy = dist.all_sum([sse, sae, sy, syy])
    n = len(rows)
    net.train(was_training)
    if n == 0:
        return {}
    sst = syy - sy * sy / n
    return {
        "mse": sse / n,
        "mae": sae / n * reward_std,
        "r2": 1.0 - sse / sst if sst > 1e-12 else math.nan,
    }


# ----------------------------------------------------------------------------- checkpoints
def _trainable(net: ValueNet) -> dict[str, nn.Parameter]:
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def _save_checkpoint(out: Path, step: int, net: ValueNet, opt: torch.optim.Optimizer, state: dict[str, Any],
                     keep: int, rng: torch.Tensor) -> None:
    """``rng``: the torch RNG state at the start of step ``step + 1`` (dropout masks), so a resumed
    run draws the same masks as an uninterrupted one."""
    from safetensors.torch import save_file

    root = out / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in _trainable(net).items()}, str(tmp / "trainable.safetensors"))
    osd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    tensors["__rng_cpu"] = rng
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    extra = {"param_groups": osd["param_groups"], "scalars": scalars, "python_random": None}
    (tmp / "optimizer.json").write_text(json.dumps(extra))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: marks the checkpoint complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(out: Path) -> Path | None:
    root = out / CKPT_DIR
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _load_checkpoint(path: Path, net: ValueNet, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file

    params = _trainable(net)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        raise TrainError(f"checkpoint {path} does not match this model's trainable tensors; pass --restart")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    tensors = load_file(str(path / "optimizer.safetensors"))
    extra = json.loads((path / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key == "__rng_cpu":
            continue
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in extra["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
    torch.set_rng_state(tensors["__rng_cpu"])
    return json.loads((path / STATE_FILE).read_text())  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- curve
def _write_curve(out: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    evals = [(h["step"], h["eval_mse"]) for h in history if "eval_mse" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train MSE", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval MSE", lw=1.5)
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="constant predictor")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE (normalised reward)")
    ax.set_title("value model training")
    ax.legend()
    fig.tight_layout()
    tmp = out / f".{CURVE_FILE}.partial.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out / CURVE_FILE)


# ----------------------------------------------------------------------------- training
def _reward_stats(rows: Sequence[ValueRow]) -> tuple[float, float]:
    ys = [r.reward for r in rows]
    mean = sum(ys) / len(ys)
    std = math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys))
    if not std > 1e-8:
        raise TrainError(
            f"all {len(ys)} training rewards equal {mean:g}: there is nothing to learn; check the reward"
        )
    return mean, std


def recorded_base_path(rows: Sequence[ValueRow]) -> Path | None:
    """The base GGUF the rows were sampled from, as make_value_data.py recorded it, if it is still
    there (rows of older files record only its name)."""
    paths = {r.base_path for r in rows if r.base_path}
    found = [Path(p) for p in sorted(paths) if Path(p).is_file()]
    return found[0] if found else None


def backbone_for_data(data: Sequence[str | os.PathLike[str]]) -> Path:
    """The backbone a value model of ``data`` trains on by default: the base model the data was
    sampled from (its recorded path), else the default base model when the data's tokenizer is its
    own (data made before paths were recorded, or on another machine)."""
    from sia_edge.models import default_base_model
    from sia_edge.value_format import fingerprint_from_gguf

    rows = read_value_rows(data)
    recorded = recorded_base_path(rows)
    if recorded is not None:
        return recorded
    fps = {r.base_fingerprint for r in rows if r.base_fingerprint}
    default = default_base_model()
    if not fps or fps == {fingerprint_from_gguf(default)}:
        return default
    path = next((r.base_path for r in rows if r.base_path), "")
    if path:
        raise TrainError(f"the data was sampled from {path}, which is not there any more: pass --backbone with its "
                         "GGUF (or a Hugging Face directory of the same model)")
    name = next((r.base_model for r in rows if r.base_model), "a model it does not name")
    raise TrainError(f"the data was sampled from {name}, and its rows do not record where that file is (they predate "
                     "base_path): pass --backbone with its GGUF (or a Hugging Face directory of the same model)")


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train a value model as ``cfg`` says; returns the before/after losses and eval metrics."""
    cfg.validate()
    dist = _init_dist()
    say: Callable[[str], None] = log if dist.main else (lambda s: None)
    if cfg.n_threads:
        torch.set_num_threads(cfg.n_threads)
    out = Path(cfg.out_dir).expanduser()
    backbone_path = check_backbone_path(cfg.backbone)
    if is_gguf_file(backbone_path):  # before anything loads: hours of training could not be exported
        check_exportable(backbone_path, cfg.lora.targets)

    rows = read_value_rows(cfg.data)
    base_path = recorded_base_path(rows)
    if not is_gguf_file(backbone_path):  # the export writes it from the base model's GGUF
        if base_path is not None:
            check_exportable(base_path, cfg.lora.targets)
        else:
            check_exportable_config(backbone_path)
    fp = backbone_fingerprint(backbone_path)
    data_fps = {r.base_fingerprint for r in rows if r.base_fingerprint}
    if data_fps and fp not in data_fps:
        raise TrainError(
            f"the backbone {backbone_path.name} has a different tokenizer (fingerprint {fp}) from the base "
            f"model the data was sampled from ({data_fps.pop()}): the token ids would mean other texts"
        )
    train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    reward_mean, reward_std = _reward_stats(train_rows)

    def prepared(rs: Sequence[ValueRow]) -> list[tuple[list[int], list[int], float]]:
        outp = []
        for r in rs:
            t = _truncate(r, cfg.max_length)
            if t is not None:
                outp.append((t[0], t[1], (r.reward - reward_mean) / reward_std))
        return outp

    train_set, eval_set = prepared(train_rows), prepared(eval_rows)
    dropped = len(train_rows) + len(eval_rows) - len(train_set) - len(eval_set)
    if dropped:
        say(f"skipped {dropped} rows whose prompt alone is longer than --max-length {cfg.max_length}")
    if not train_set:
        raise TrainError(f"no training rows fit in --max-length {cfg.max_length}")

    say(f"loading backbone {backbone_path}")
    torch.manual_seed(cfg.seed)
    backbone: Any = load_backbone(backbone_path, cfg.layers)
    vocab = int(backbone.config.vocab_size)
    bad = next((t for p, r, _ in train_set + eval_set for t in p + r if not 0 <= t < vocab), None)
    if bad is not None:
        raise TrainError(f"token id {bad} in the data is outside the backbone's vocabulary of {vocab}")
    pad_id = int(backbone.config.pad_token_id or 0) if 0 <= int(backbone.config.pad_token_id or 0) < vocab else 0
    source = backbone_path if is_gguf_file(backbone_path) else base_path  # what the export writes from
    if source is not None:  # every rank: a refusal must stop them all
        rel = check_backbone_parity(backbone, source, layers=cfg.layers, same_weights=source == backbone_path,
                                    n_threads=cfg.n_threads)
        say(f"llama.cpp computes the backbone's hidden states from {source.name} within {rel:.1%} of PyTorch")
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    net = ValueNet(add_lora(backbone, cfg.lora), int(backbone.config.hidden_size))
    net.train()
    params = _trainable(net)
    head_params = [p for n, p in params.items() if n.startswith("head.")]
    lora_params = [p for n, p in params.items() if not n.startswith("head.")]
    groups: list[dict[str, Any]] = [{"params": lora_params}, {"params": head_params, "lr": cfg.head_lr or cfg.lr}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model: Any = net
    if dist.active:
        # No buffer sync per forward: the rotary buffers are constants, and evaluation runs the
        # bare module on uneven shards, where a collective per forward would deadlock.
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        no_sync: dict[str, Any] = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        model = DistributedDataParallel(net, **no_sync)

    rows_per_step = cfg.batch_size * cfg.grad_accum
    per_rank = math.ceil(len(train_set) / dist.world)
    steps_per_epoch = math.ceil(per_rank / rows_per_step)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    run_fp = cfg.fingerprint()
    step = 0
    history: list[dict[str, Any]] = []
    subset = train_set[:TRAIN_SUBSET]
    ckpt = None if cfg.restart else _latest_checkpoint(out)
    if cfg.restart and dist.main:
        shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
        (out / METRICS_FILE).unlink(missing_ok=True)
    dist.barrier()
    if ckpt is not None:
        state = json.loads((ckpt / STATE_FILE).read_text())
        if state.get("run_fingerprint") != run_fp:
            raise TrainError(
                f"{out} has checkpoints of a run with other data or settings; pass --restart to discard "
                "them, or another --out"
            )
        state = _load_checkpoint(ckpt, net, opt)
        step = int(state["step"])
        history = list(state.get("history", []))
        before = state["before"]
        say(f"resuming from {ckpt.name} (step {step} of {total_steps})")
        if dist.main:  # forget metrics logged after the checkpoint: those steps run again
            (out / METRICS_FILE).write_text("".join(json.dumps(h) + "\n" for h in history if h.get("step", 0) > 0))
    else:
        say(f"{len(train_set)} training rows, {len(eval_set)} eval rows; reward mean {reward_mean:.4g}, "
            f"std {reward_std:.4g}; {total_steps} steps of {rows_per_step * dist.world} rows")
        before = {"train_mse": _evaluate(net, subset, cfg.batch_size, reward_std, dist, pad_id).get("mse", math.nan),
                  **{f"eval_{k}": v for k, v in
                     _evaluate(net, eval_set, cfg.batch_size, reward_std, dist, pad_id).items()}}
        history.append({"step": 0, **{k: v for k, v in before.items() if k in ("eval_mse", "eval_r2", "eval_mae")}})
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)

    def state_dict() -> dict[str, Any]:
        return {"step": step, "run_fingerprint": run_fp, "history": history, "before": before,
                "reward_mean": reward_mean, "reward_std": reward_std}

    bar = None
    if cfg.progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    last_saved = step
    rng_resume = torch.get_rng_state()
    t0 = time.perf_counter()
    try:
        while step < total_steps:
            rng_resume = torch.get_rng_state()  # what a resumed run needs to redo this step
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = _epoch_order(len(train_set), cfg.seed, epoch, dist)
            group = [train_set[i] for i in order[in_epoch * rows_per_step:(in_epoch + 1) * rows_per_step]]
            if not group:
                group = [train_set[i] for i in order[:rows_per_step]]
            opt.zero_grad(set_to_none=True)
            micro = [group[i:i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)]
            loss_sum = 0.0
            for mi, rows_mb in enumerate(micro):
                b = _collate(rows_mb, pad_id)
                sync = mi == len(micro) - 1
                ctx = model.no_sync() if dist.active and not sync else contextlib.nullcontext()
                with ctx:
                    pred = response_mean(model(b.input_ids, b.attention_mask), b.response_mask)
                    loss = ((pred - b.target) ** 2).sum() / len(group)
                    loss.backward()
                loss_sum += float(loss.detach())
            if not math.isfinite(loss_sum):
                raise TrainError(f"the loss became {loss_sum} at step {step + 1}; lower --lr")
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            step += 1
            rng_resume = torch.get_rng_state()
            loss_sum = dist.all_sum([loss_sum])[0] / dist.world
            rec: dict[str, Any] = {"step": step, "train_loss": loss_sum, "epoch": step / steps_per_epoch}
            if step % cfg.eval_every == 0 or step == total_steps:
                ev = _evaluate(net, eval_set, cfg.batch_size, reward_std, dist, pad_id)
                rec.update({f"eval_{k}": v for k, v in ev.items()})
            history.append(rec)
            if dist.main:
                with open(out / METRICS_FILE, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if "eval_mse" in rec:
                    _write_curve(out, history)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.4f}", **({"eval_r2": f"{rec['eval_r2']:.3f}"} if "eval_r2" in rec else {}))
                bar.update(1)
            if step % cfg.save_every == 0 and step < total_steps:
                if dist.main:
                    _save_checkpoint(out, step, net, opt, state_dict(), cfg.keep_checkpoints, torch.get_rng_state())
                last_saved = step
                dist.barrier()
    except KeyboardInterrupt:
        if dist.main and step > last_saved and not dist.active:
            _save_checkpoint(out, step, net, opt, state_dict(), cfg.keep_checkpoints, rng_resume)
            say(f"\nsaved a checkpoint at step {step}; rerun the same command to resume")
        raise
    finally:
        if bar is not None:
            bar.close()
    if step > last_saved:  # a final checkpoint: rerunning with more steps or epochs continues from here
        if dist.main:
            _save_checkpoint(out, step, net, opt, state_dict(), cfg.keep_checkpoints, rng_resume)
        dist.barrier()

    after_train = _evaluate(net, subset, cfg.batch_size, reward_std, dist, pad_id).get("mse", math.nan)
    after_eval = _evaluate(net, eval_set, cfg.batch_size, reward_std, dist, pad_id)
    result = TrainResult(
        out_dir=out, steps=step, train_loss_before=float(before["train_mse"]), train_loss_after=after_train,
        eval_before={k[5:]: v for k, v in before.items() if k.startswith("eval_")}, eval_after=after_eval,
        reward_mean=reward_mean, reward_std=reward_std,
    )
    if dist.main:
        base_model = next((r.base_model for r in rows if r.base_model), "")
        reward_name = cfg.objective or next((r.reward_name for r in rows if r.reward_name), "")
        from sia_edge.models import default_base_model

        try:
            is_default = backbone_path.resolve() == default_base_model().resolve()
        except FileNotFoundError:
            is_default = False
        meta = ValueMeta(
            backbone=str(backbone_path.resolve()), tokenizer_fingerprint=fp, hidden_size=net.head.in_features,
            reward_mean=reward_mean, reward_std=reward_std, reward_name=reward_name, base_model=base_model,
            lora=asdict(cfg.lora), layers=cfg.layers,
            training={
                "steps": step, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip,
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "world_size": dist.world,
                "max_length": cfg.max_length, "seed": cfg.seed, "eval_fraction": cfg.eval_fraction,
                "data": [str(Path(p).resolve()) for p in cfg.data], "n_train": len(train_set), "n_eval": len(eval_set),
                "base_gguf": str(backbone_path.resolve()) if is_gguf_file(backbone_path) else None,
                "base_path": str(base_path) if base_path is not None else None,
                "backbone_is_default": is_default, "seconds": round(time.perf_counter() - t0, 1),
            },
            metrics={"train_mse_before": result.train_loss_before, "train_mse_after": after_train,
                     **{f"eval_{k}_after": v for k, v in after_eval.items()},
                     **{f"eval_{k}_before": v for k, v in result.eval_before.items()}},
        )
        save_value_model(out, net, meta)
        _write_curve(out, history)
        say(f"saved the value model to {out} (train MSE {result.train_loss_before:.4f} -> {after_train:.4f}"
            + (f", eval R^2 {after_eval['r2']:.3f}" if after_eval.get("r2") is not None else "") + ")")
    dist.barrier()
    return result


