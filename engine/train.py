"""Training (paper section 4.2; ``aca train``): few-shot vid2vid's recipe with ACA's or the pixel-wise attention.

One iteration (``Trainer.train_step``) on a batch from ``engine.data.ClipSampler``:

1. Encode the m references and extract the memory once (eqs 1-4; per reference set, as at inference).
2. Generate ``n_frames`` consecutive frames recurrently: the first without a previous frame, each next one with the
   previous *generated* frame (detached) and its label, as few-shot vid2vid trains its temporal path.
3. Generator step: hinge GAN, feature matching, L1, warp, landmark-flow and mask losses (engine/losses.py).
4. Discriminator step: hinge loss on real and (detached) generated frames, conditioned on the label.

Adam (0.5, 0.999), lr 4e-4 decayed linearly to 0 over ``steps`` for both networks (paper 4.2). A run directory
holds ``train_state.pt`` (both networks, optimisers, schedulers, RNG and sampler state, history: for resuming),
``model.pt`` (the generator's weights only, an engine/runtime/checkpoint.py file for inference), ``history.jsonl``
(losses per logged step), ``samples/step_XXXXXX.png`` (label | references | output | ground truth) and
``losses.png`` (loss curves). Runs are seeded: the same config and seed give the same weights, resumed or not.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import ModelConfig, preset
from engine.data import Batch, ClipSampler, SequenceSource, SyntheticSequences, VideoFolderSequences
from engine.losses import (
    DEFAULT_WEIGHTS,
    MultiscaleDiscriminator,
    VGGPerceptualLoss,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    landmark_flow_loss,
    mask_loss,
)
from engine.model.vid2vid import ACAVid2Vid, Outputs
from engine.runtime.checkpoint import save_checkpoint

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.jsonl"
STATE_FORMAT = "aca.train_state.v1"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on besides the code. Stored in every checkpoint; a resumed run uses the stored one."""

    preset: str = "face-64"
    attention: str | None = None  # None: the preset's; "compact" or "pixel" to override
    steps: int = 2000
    batch_size: int = 4
    lr: float = 4e-4
    betas: tuple[float, float] = (0.5, 0.999)
    n_refs: int | None = None  # m; None: the preset's n_refs
    n_frames: int = 2  # consecutive frames generated recurrently per sample
    seed: int = 0
    data: str = "synthetic"  # "synthetic" or a folder of talking-head videos
    n_identities: int = 300  # synthetic training identities (held-out seeds excluded: engine.data)
    clips_per_identity: int = 2
    clip_frames: int = 24
    ndf: int = 32
    d_layers: int = 3
    n_scales: int = 2
    weights: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    vgg_weights: str | None = None  # a local torchvision vgg19 state dict; None: no perceptual loss
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 200
    device: str = "cpu"

    def model_config(self) -> ModelConfig:
        return preset(self.preset, **({"attention": self.attention} if self.attention else {}))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def build_source(tcfg: TrainConfig, size: int) -> SequenceSource:
    if tcfg.data == "synthetic":
        return SyntheticSequences.train(tcfg.n_identities, size, n_frames=tcfg.clip_frames,
                                        clips_per_identity=tcfg.clips_per_identity,
                                        cache_clips=tcfg.n_identities * tcfg.clips_per_identity)
    return VideoFolderSequences(Path(tcfg.data), size, split="train")


def linear_decay(total: int) -> Callable[[int], float]:
    """lr multiplier: 1 at step 0, linearly to 0 at ``total`` (paper 4.2)."""
    return lambda step: max(0.0, 1.0 - step / max(total, 1))


def _atomic_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Trainer:
    """One training run: generator G (ACAVid2Vid), discriminator D, their optimisers, data and history."""

    def __init__(self, tcfg: TrainConfig, out_dir: Path | None = None, source: SequenceSource | None = None) -> None:
        self.tcfg = tcfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.cfg = tcfg.model_config()
        self.device = torch.device(tcfg.device)
        torch.manual_seed(tcfg.seed)
        self.G = ACAVid2Vid(self.cfg).to(self.device)
        self.D = MultiscaleDiscriminator(self.cfg.label_nc, self.cfg.image_nc, tcfg.ndf, tcfg.d_layers,
                                         tcfg.n_scales).to(self.device)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=tcfg.lr, betas=tcfg.betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=tcfg.lr, betas=tcfg.betas)
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, linear_decay(tcfg.steps))
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, linear_decay(tcfg.steps))
        self.vgg = VGGPerceptualLoss(Path(tcfg.vgg_weights)).to(self.device) if tcfg.vgg_weights else None
        self.m = tcfg.n_refs or self.cfg.n_refs
        self.source = source if source is not None else build_source(tcfg, self.cfg.image_size)
        self.sampler = ClipSampler(self.source, self.m, tcfg.n_frames, seed=tcfg.seed)
        self.step = 0
        self.wall_seconds = 0.0  # training wall time over every session of the run (resumes add up)
        self.history: list[dict[str, float]] = []
        self.last_batch: Batch | None = None
        self.last_outputs: list[Outputs] = []

    # ------------------------------------------------------------------------------------------ one iteration

    def generate(self, batch: Batch) -> list[Outputs]:
        """Steps 1-2 of the module docstring: the memory once, then the frames recurrently."""
        memory = self.G.extract(self.G.encode_references(batch.ref_images, batch.ref_labels))
        outs: list[Outputs] = []
        for t in range(batch.n_frames):
            prev = {} if t == 0 else {"prev_image": outs[-1].image.detach(), "prev_label": batch.labels[:, t - 1]}
            outs.append(self.G.synthesize(batch.labels[:, t], memory, batch.ref_images, batch.ref_labels, **prev))
        return outs

    def reconstruction_losses(self, batch: Batch, outs: list[Outputs]) -> dict[str, Tensor]:
        """L1, warp, landmark-flow and mask losses, averaged over the frames (unweighted)."""
        zero = batch.images.new_zeros(())
        terms = {"l1": zero, "l1_raw": zero, "warp": zero, "flow": zero, "mask": zero}
        for t, out in enumerate(outs):
            gt, lm = batch.images[:, t], batch.landmarks[:, t]  # (B, 3, H, W), (B, N, 2)
            src_lm = batch.ref_landmarks[torch.arange(len(gt), device=gt.device), out.ref_index]  # (B, N, 2)
            terms["l1"] = terms["l1"] + F.l1_loss(out.image, gt)
            terms["l1_raw"] = terms["l1_raw"] + F.l1_loss(out.raw, gt)
            terms["warp"] = terms["warp"] + F.l1_loss(out.ref_warp, gt)
            terms["flow"] = terms["flow"] + landmark_flow_loss(out.flow_ref, lm, src_lm)
            terms["mask"] = terms["mask"] + mask_loss(out.mask_ref, out.ref_warp, gt)
            if out.prev_warp is not None and out.flow_prev is not None and out.mask_prev is not None:
                terms["warp"] = terms["warp"] + F.l1_loss(out.prev_warp, gt)
                terms["flow"] = terms["flow"] + landmark_flow_loss(out.flow_prev, lm, batch.landmarks[:, t - 1])
                terms["mask"] = terms["mask"] + mask_loss(out.mask_prev, out.prev_warp, gt)
        return {k: v / len(outs) for k, v in terms.items()}

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One iteration (module docstring, steps 1-4); returns the losses (unweighted) and the step's seconds."""
        start = time.perf_counter()
        self.G.train()
        self.D.train()
        batch = batch.to(self.device)
        w = self.tcfg.weights
        outs = self.generate(batch)
        labels = batch.labels.flatten(0, 1)  # (B, T, L, H, W) -> (B*T, L, H, W)
        real = batch.images.flatten(0, 1)
        fake = torch.stack([o.image for o in outs], dim=1).flatten(0, 1)  # (B, T, 3, H, W) -> (B*T, 3, H, W)

        # Generator step. D's real features are computed with D's gradients on (reused by its own step below);
        # for the generator's terms D is frozen, so the G backward does not fill D's gradients.
        pred_real = self.D(labels, real)
        self.D.requires_grad_(False)
        pred_fake = self.D(labels, fake)
        self.D.requires_grad_(True)
        terms = self.reconstruction_losses(batch, outs)
        terms["gan"] = hinge_g_loss(pred_fake)
        terms["fm"] = feature_matching_loss(pred_real, pred_fake)
        if self.vgg is not None:
            terms["vgg"] = self.vgg(fake, real)
        loss_G = sum((w.get(k, 0.0) * v for k, v in terms.items()), fake.new_zeros(()))
        self.opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        self.opt_G.step()

        # Discriminator step on the detached fakes.
        loss_D = hinge_d_loss(pred_real, self.D(labels, fake.detach()))
        self.opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        self.opt_D.step()

        self.sched_G.step()
        self.sched_D.step()
        self.step += 1
        self.last_batch, self.last_outputs = batch, [o for o in outs]
        row = {k: float(v.detach()) for k, v in terms.items()}
        row.update(g_total=float(loss_G.detach()), d=float(loss_D.detach()), seconds=time.perf_counter() - start)
        return row

    # ------------------------------------------------------------------------------------------------- runs

    def run(self, steps: int | None = None, progress: bool = True, max_seconds: float | None = None) -> None:
        """Train until ``steps`` (default: the config's) or ``max_seconds``; log, sample and checkpoint as it goes."""
        target = min(steps if steps is not None else self.tcfg.steps, self.tcfg.steps)
        deadline = time.monotonic() + max_seconds if max_seconds is not None else None
        bar = _Progress(target, self.step, enabled=progress)
        with bar:
            while self.step < target and (deadline is None or time.monotonic() < deadline):
                data_start = time.perf_counter()
                batch = self.sampler.sample(self.tcfg.batch_size)
                row = self.train_step(batch)
                row["data_seconds"] = time.perf_counter() - data_start - row["seconds"]
                self.wall_seconds += time.perf_counter() - data_start
                self._after_step(row)
                bar.update(self.step, row)
        if self.out_dir is not None:
            self.save()

    def _after_step(self, row: dict[str, float]) -> None:
        t = self.tcfg
        if self.step % t.log_every == 0 or self.step == 1:
            self.history.append({"step": float(self.step), "lr": float(self.sched_G.get_last_lr()[0]), **row})
            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                with open(self.out_dir / HISTORY_FILE, "a") as f:
                    f.write(json.dumps(self.history[-1]) + "\n")
        if self.out_dir is None:
            return
        if self.step % t.sample_every == 0:
            self.write_samples()
            plot_losses(self.history, self.out_dir / "losses.png")
        if self.step % t.checkpoint_every == 0:
            self.save()

    def write_samples(self) -> Path | None:
        if self.out_dir is None or self.last_batch is None or not self.last_outputs:
            return None
        b = self.last_batch
        path = self.out_dir / "samples" / f"step_{self.step:06d}.png"
        sample_grid(b.labels[:, -1], b.ref_images, self.last_outputs[-1].image, b.images[:, -1], path)
        return path

    # ----------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "train_config": self.tcfg.to_dict(),
            "model_config": self.cfg.to_dict(),
            "step": self.step,
            "wall_seconds": self.wall_seconds,
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "sampler_rng": json.dumps(self.sampler.state()),  # numpy's state holds big ints: keep them as text
            "history": json.dumps(self.history),
        }

    def save(self) -> str:
        """Write ``train_state.pt`` (resumable) and ``model.pt`` (weights only); return the model's sha256."""
        if self.out_dir is None:
            raise ValueError("this trainer has no output directory")
        _atomic_save(self.state_dict(), self.out_dir / STATE_FILE)
        return self.export(self.out_dir / MODEL_FILE)

    def export(self, path: Path) -> str:
        """The inference checkpoint (no optimiser or discriminator): what ships under models/."""
        meta = {"train_config": self.tcfg.to_dict(), "data": self.tcfg.data, "wall_seconds": self.wall_seconds}
        return save_checkpoint(path, self.G, step=self.step, meta=meta)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError("not a training state of this project")
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.sched_G.load_state_dict(state["sched_G"])
        self.sched_D.load_state_dict(state["sched_D"])
        torch.set_rng_state(state["torch_rng"])
        self.sampler.set_state(json.loads(state["sampler_rng"]))
        self.history = json.loads(state["history"])
        self.step = int(state["step"])
        self.wall_seconds = float(state.get("wall_seconds", 0.0))

    @classmethod
    def resume(cls, out_dir: Path, source: SequenceSource | None = None, **changes: Any) -> Trainer:
        """The run in ``out_dir`` as it was at its last checkpoint (``changes``: e.g. another device)."""
        state = torch.load(Path(out_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        tcfg = TrainConfig.from_dict(state["train_config"])
        if changes:
            tcfg = dataclasses.replace(tcfg, **changes)
        trainer = cls(tcfg, out_dir, source)
        trainer.load_state_dict(state)
        return trainer


class _Progress:
    """A rich progress bar with the latest losses (or nothing, for tests and logs)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                               TextColumn("{task.fields[info]}"))
            self._task = self._p.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._p.stop()

    def update(self, step: int, row: dict[str, float]) -> None:
        if self.enabled:
            info = f"G {row['g_total']:.3f} L1 {row['l1']:.3f} D {row['d']:.3f} {row['seconds']:.2f}s/it"
            self._p.update(self._task, completed=step, info=info)


# ------------------------------------------------------------------------------------------------- pictures


def to_uint8_image(x: Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def sample_grid(labels: Tensor, ref_images: Tensor, outputs: Tensor, truth: Tensor, path: Path, rows: int = 4) -> None:
    """One row per sample: label | references | output | ground truth. labels (B, L, H, W), ref_images
    (B, m, 3, H, W), outputs and truth (B, 3, H, W)."""
    from PIL import Image

    from engine.labels import label_to_rgb

    tiles = []
    for b in range(min(rows, len(labels))):
        row = [label_to_rgb(labels[b].detach().float().cpu().numpy())]
        row += [to_uint8_image(r) for r in ref_images[b]]
        row += [to_uint8_image(outputs[b]), to_uint8_image(truth[b])]
        tiles.append(np.concatenate(row, axis=1))  # (H, (m + 3) * W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)


def plot_losses(history: list[dict[str, float]], path: Path, keys: tuple[str, ...] = ("g_total", "l1", "d"),
                size: tuple[int, int] = (720, 300)) -> None:
    """Loss curves drawn with PIL (matplotlib is not a dependency): one panel per key, its own y range."""
    from PIL import Image, ImageDraw

    if len(history) < 2:
        return
    W, H = size
    img = Image.new("RGB", (W, H * len(keys)), "white")
    draw = ImageDraw.Draw(img)
    steps = np.array([r["step"] for r in history])
    for k, key in enumerate(keys):
        y = np.array([r.get(key, np.nan) for r in history], dtype=np.float64)
        ok = np.isfinite(y)
        if ok.sum() < 2:
            continue
        top, left, pw, ph = k * H + 24, 60, W - 80, H - 54
        lo, hi = float(y[ok].min()), float(y[ok].max())
        hi = hi if hi > lo else lo + 1.0
        draw.rectangle([left, top, left + pw, top + ph], outline="black")
        draw.text((left, top - 18), f"{key}  (last {y[ok][-1]:.4g})", fill="black")
        draw.text((4, top), f"{hi:.3g}", fill="black")
        draw.text((4, top + ph - 10), f"{lo:.3g}", fill="black")
        draw.text((left, top + ph + 4), f"step {int(steps[0])}", fill="black")
        draw.text((left + pw - 80, top + ph + 4), f"step {int(steps[-1])}", fill="black")
        xs = left + (steps[ok] - steps[0]) / max(steps[-1] - steps[0], 1) * pw
        ys = top + ph - (y[ok] - lo) / (hi - lo) * ph
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=(200, 200, 255), width=1)
        # A moving average over ~5% of the points makes the trend readable over the GAN's noise.
        n = max(1, int(ok.sum()) // 20)
        smooth = np.convolve(y[ok], np.ones(n) / n, mode="valid")
        draw.line(list(zip(xs[n - 1:].tolist(), (top + ph - (smooth - lo) / (hi - lo) * ph).tolist(), strict=True)),
                  fill=(20, 40, 200), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


__all__ = ["TrainConfig", "Trainer", "build_source", "linear_decay", "plot_losses", "sample_grid"]
