"""The training loop: TwinFlowLoss on a patched diffusers transformer, one process or many.

Determinism: the loss's random draws for micro-batch m of optimizer step s on rank r use a
generator seeded from (seed, s, r·accum + m), so a resumed run draws exactly what an
uninterrupted one would, and one process with ``grad_accum_steps = N`` computes the same
update as N processes with one micro-batch each (given the same micro-batches).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil
import time
from typing import Dict, List, Optional

import torch

from .. import diffusers_patch
from .._lock import OutputDirLock
from . import checkpoint as ckpt
from .config import RunConfig
from .distributed import Dist, no_grad_sync, resolve_strategy, shard, wrap
from .models import TextEncoder, TwinFlowModel, add_lora, load_transformer, load_vae
from .teacher import ONLINE_ADAPTER, TEACHER_ADAPTER, bind_full, make_teacher

logger = logging.getLogger(__name__)


class NonFiniteLoss(ValueError):
    pass


def shard_seed(seed: int, step: int, shard_index: int, stream: int = 0) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, step, shard_index, stream]).generate_state(1, np.uint64)[0] >> 1)


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_grid(images: torch.Tensor, path: pathlib.Path, cols: Optional[int] = None) -> None:
    """[N, 3, H, W] in [-1, 1] → one PNG, `cols` (default ceil(√N)) images per row."""
    import numpy as np
    from PIL import Image

    n, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


class Trainer:
    def __init__(self, cfg: RunConfig, *, dataset_path, output_dir, d: Dist, resume: Optional[str] = None,
                 progress: bool = True, overwrite: bool = False):
        self._lock = None
        try:
            self._build(cfg, dataset_path, output_dir, d, resume, progress, overwrite)
        except BaseException:
            self.close()  # a failed start leaves the output folder free
            raise

    def _build(self, cfg, dataset_path, output_dir, d, resume, progress, overwrite):
        from twinflow import TwinFlowLoss

        from .data import load_null_embeds, make_loader, open_dataset

        self.cfg, self.d, self.progress = cfg, d, progress
        t = cfg.training
        self.out = pathlib.Path(output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.out.mkdir(parents=True, exist_ok=True)
        self.family = diffusers_patch.backbone(cfg.model.name)
        self.lora = cfg.lora.enabled
        self.strategy = resolve_strategy(t.strategy, d.world, self.lora)
        self.accum = t.grad_accum_steps
        torch.manual_seed(t.seed)  # the same initial weights (LoRA init) on every rank
        resume_from = self._resolve_resume(resume, overwrite)  # before loading models: fail fast
        self.loss_fn = TwinFlowLoss(cfg.twinflow.recipe, **cfg.twinflow.settings())

        # data
        if self.family.edit and cfg.data.null_text_embeds is not None:
            raise ValueError(f"data.null_text_embeds: {self.family.name} is an editing family: its unconditional "
                             "text is encoded per batch with the reference images (precomputed embeddings are not "
                             "used for editing families); leave it null")
        self.dataset = open_dataset(dataset_path, cfg.data, video=self.family.video, reference=self.family.edit)
        self.loader = make_loader(self.dataset, batch_size=t.batch_size, world=d.world, rank=d.rank,
                                  shuffle=cfg.data.shuffle, seed=t.seed, num_workers=cfg.data.num_workers)
        # bf16 autocast where the device has it; elsewhere everything runs in float32 (frozen
        # bf16 weights would meet float32 activations without autocast).
        self.autocast = (t.mixed_precision == "bf16" and d.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.frozen_dtype = getattr(torch, cfg.model.frozen_dtype) if self.autocast else torch.float32
        first = self.dataset[0]
        self.text_encoder = TextEncoder(cfg, self.family, d.device, self.frozen_dtype) if "text" in first else None
        self.vae = load_vae(cfg, self.family, d.device, self.frozen_dtype)
        if "pixel_values" in first and self.vae is None:
            raise ValueError(f"{cfg.model.pretrained_model_name_or_path} has no vae/ folder, needed to encode "
                             "images (or give the dataset precomputed latents)")
        self.latent_shape = None
        if "pixel_values" not in first and "latents" not in first:
            self.latent_shape = self._prompts_only_latent_shape()
        # an editing family's unconditional text may read the reference: encoded per batch (_batch)
        self.null = None if self.family.edit else self._null_embeds(load_null_embeds(cfg.data.null_text_embeds))

        # model, teacher, wrapping, optimizer
        transformer = load_transformer(cfg, self.family, lora=self.lora, frozen_dtype=self.frozen_dtype,
                                       resuming=resume_from is not None, device=d.device)
        if t.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if self.lora:
            transformer.requires_grad_(False)
            add_lora(transformer, cfg.lora, ONLINE_ADAPTER)
        self.raw = TwinFlowModel(transformer, self.family)
        if self.strategy != "fsdp":  # fully_shard moves each unit to the device as it shards it
            self.raw.to(d.device)
        self.teacher = make_teacher(self.loss_fn, self.raw, lora=self.lora)
        self.model = wrap(self.raw, self.strategy, d, transformer=transformer, block_attrs=self.family.block_attrs)
        if self.teacher is not None and not self.lora:
            shard_fn = None
            if self.strategy == "fsdp":
                def shard_fn(m):
                    return shard(m, m.transformer, self.family.block_attrs, reshard_root=True)
            bind_full(self.teacher, self.model, shard_fn)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(t, self.params, d.device)
        per_pass = len(self.loader) // self.accum
        if per_pass < 1:
            raise ValueError(f"one pass over the data gives {len(self.loader)} micro-batches per process, fewer than "
                             f"training.grad_accum_steps = {self.accum}")
        self.steps_per_epoch = t.steps_per_epoch or per_pass
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        from diffusers.optimization import get_scheduler

        self.sched = get_scheduler(t.lr_scheduler, self.opt, num_warmup_steps=t.lr_warmup_steps,
                                   num_training_steps=self.total_steps)

        # position: optimizer steps done; data passes started and micro-batches used in this pass
        self.step, self.data_pass, self.used_in_pass = 0, 0, 0
        self.last_checkpoint: Optional[pathlib.Path] = None
        self.tb = None
        if resume_from is not None:
            self.load(resume_from)

    def _resolve_resume(self, resume: Optional[str], overwrite: bool) -> Optional[pathlib.Path]:
        """Rank 0 locks the output folder (one run at a time), picks and verifies the
        checkpoint (hashing it once); every rank gets the answer or the same error."""
        found = None
        if self.d.main:
            try:
                self._lock = OutputDirLock(self.out).acquire()
                found = ckpt.resolve_resume(resume, self.ckpt_root, overwrite)
            except ValueError as e:
                self.close()
                found = e
        found = self.d.broadcast_object(found)
        if isinstance(found, ValueError):
            raise found
        return found

    def close(self) -> None:
        """Release the output folder (also released when the process ends, however it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ conditioning

    def _to_cond(self, embeds: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        missing = [k for k in self.family.text_keys if k not in embeds]
        if missing:
            raise ValueError(f"text embeddings lack {missing} (a {self.family.name} model needs "
                             f"{list(self.family.text_keys)}); got {sorted(embeds)}")
        out = []
        for k in self.family.text_keys:
            v = embeds[k].to(self.d.device)
            out.append(v.float() if v.is_floating_point() else v)
        return out

    def _prompts_only_latent_shape(self):
        """A prompts-only dataset trains image-free: the loss replaces every row's x by one-step
        fakes (docs/algorithm.md §3.1), so x only needs its shape, which one VAE encoding gives."""
        if not self.loss_fn.config["use_image_free"]:
            raise ValueError(f"the dataset has prompts only (no image column {self.cfg.data.image_column!r}, no "
                             "latents): that trains only with twinflow.use_image_free: true")
        if self.vae is None:
            raise ValueError(f"{self.cfg.model.pretrained_model_name_or_path} has no vae/ folder, needed for the "
                             "latent size of a prompts-only dataset")
        r = self.cfg.data.resolution
        frames = (self.cfg.data.num_frames,) if self.family.video else ()  # clips [1, 3, F, r, r]
        with torch.no_grad():
            lat = self.family.encode_latents(self.vae, torch.zeros(1, 3, *frames, r, r, device=self.d.device),
                                             torch.Generator(self.d.device).manual_seed(0))
        return tuple(lat.shape[1:])

    def _null_embeds(self, from_file) -> Optional[List[torch.Tensor]]:
        if self.text_encoder is not None:
            return self._to_cond(self.text_encoder(list(self.family.null_texts)))
        if from_file is not None:
            return [t if t.dim() and t.shape[0] == 1 else t[None] for t in self._to_cond(from_file)]
        if float(self.loss_fn.config["enhanced_ratio"]) != 0.0:
            raise ValueError("twinflow.enhanced_ratio needs the empty prompt's embeddings: the dataset has "
                             "precomputed text embeddings, so set data.null_text_embeds (a safetensors file "
                             "with the same keys) or twinflow.enhanced_ratio: 0")
        return None

    def _batch(self, batch, step: int, shard_index: int):
        if "latents" in batch:
            x = batch["latents"].to(self.d.device).float()
        elif self.latent_shape is not None:  # prompts only, image-free: x is replaced by fakes
            x = torch.zeros((len(batch["text"]), *self.latent_shape), device=self.d.device)
        else:
            g = torch.Generator(self.d.device).manual_seed(shard_seed(self.cfg.training.seed, step, shard_index, 1))
            with torch.no_grad():
                x = self.family.encode_latents(self.vae, batch["pixel_values"].to(self.d.device), g)
        if self.family.edit:
            return (x, *self._edit_conditioning(batch))
        with torch.no_grad():
            embeds = batch["text_embeds"] if "text_embeds" in batch else self.text_encoder(batch["text"])
        cond = self._to_cond(embeds)
        uncond = None if self.null is None else [u.expand(x.shape[0], *u.shape[1:]) for u in self.null]
        return x, cond, uncond

    @torch.no_grad()
    def _edit_conditioning(self, batch):
        """(cond, uncond) of an editing family: the text tensors read with the reference images, then
        the reference latents (posterior mode, as the edit pipelines encode them; never noised); the
        unconditional branch is the family's null text, with the same references (the published
        Qwen-Image-Edit recipe, diffusers_patch/qwen_image_edit.py)."""
        from .data import REFERENCE

        refs = batch[REFERENCE].to(self.d.device)
        ref = self.family.encode_latents(self.vae, refs, None).float()
        cond = self._to_cond(self.text_encoder(batch["text"], references=refs)) + [ref]
        uncond = self._to_cond(self.text_encoder(list(self.family.null_texts) * len(refs), references=refs)) + [ref]
        return cond, uncond

    # ------------------------------------------------------------------ data stream

    def micro_batches(self):
        """Micro-batches forever, one data pass after another, from the saved position."""
        while True:
            self.loader.sampler.set_epoch(self.data_pass, skip=self.used_in_pass * self.cfg.training.batch_size)
            for batch in self.loader:
                self.used_in_pass += 1
                yield batch
            self.data_pass, self.used_in_pass = self.data_pass + 1, 0

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, batches) -> Dict[str, float]:
        decay = self.teacher.update() if self.teacher is not None else None  # the loss's own teacher
        stats: Dict[str, float] = {}
        for m in range(self.accum):
            x, cond, uncond = self._batch(next(batches), self.step, self.d.rank * self.accum + m)
            g = torch.Generator(self.d.device).manual_seed(
                shard_seed(self.cfg.training.seed, self.step, self.d.rank * self.accum + m))
            with no_grad_sync(self.model, self.strategy, sync=m == self.accum - 1):
                try:
                    with torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                        loss = self.loss_fn(self.model, x, cond=cond, uncond=uncond, generator=g)
                    value = loss.detach().float().item()
                except FloatingPointError:  # TwinFlowLoss refuses a NaN/Inf loss; every rank must still vote
                    value = float("nan")
                if not self.d.all_true(math.isfinite(value)):
                    where = self.last_checkpoint or "none (no checkpoint was written yet)"
                    raise NonFiniteLoss(f"non-finite loss ({value}) at step {self.step + 1}: stopping. "
                                        f"The last good checkpoint is {where}")
                (loss / self.accum).backward()
            for k, v in self.loss_fn.last_stats.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    stats[k] = stats.get(k, 0.0) + v / self.accum
        if self.cfg.training.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.training.grad_clip)
            stats["grad_norm"] = float(_full(norm))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        stats["lr"] = self.sched.get_last_lr()[0]
        if decay is not None:
            stats["ema_decay"] = decay
        return stats

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> pathlib.Path:
        """Collective: every rank takes part in gathering; rank 0 writes."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        transformer = self.raw.transformer
        if self.lora:
            from peft import get_peft_model_state_dict

            model_sd = get_peft_model_state_dict(transformer, adapter_name=ONLINE_ADAPTER)
            teacher_sd = (get_peft_model_state_dict(transformer, adapter_name=TEACHER_ADAPTER)
                          if self.teacher is not None else None)
        else:
            model_sd = get_model_state_dict(self.model, options=opts)
            teacher_sd = get_model_state_dict(self.teacher.module, options=opts) if self.teacher else None
        optim_sd = get_optimizer_state_dict(self.model, self.opt, options=opts)
        rngs = self.d.gather_objects(ckpt.rng_state())
        path = None
        if self.d.main:
            state = {"step": self.step, "data_pass": self.data_pass, "used_in_pass": self.used_in_pass,
                     "world": self.d.world, "batch_size": self.cfg.training.batch_size, "accum": self.accum,
                     "optimizer": optim_sd, "lr_scheduler": self.sched.state_dict(),
                     "loss_fn": self.loss_fn.state_dict()}

            def writer(tmp: pathlib.Path):
                if self.lora:
                    ckpt.save_peft(tmp / "lora", transformer.peft_config[ONLINE_ADAPTER], model_sd)
                    if teacher_sd is not None:
                        ckpt.save_peft(tmp / "lora_teacher", transformer.peft_config[TEACHER_ADAPTER], teacher_sd)
                else:
                    strip = len("transformer.")
                    ckpt.save_diffusers(tmp / "transformer", transformer, {k[strip:]: v for k, v in model_sd.items()})
                    if teacher_sd is not None:
                        ckpt.save_diffusers(tmp / "transformer_ema", transformer,
                                            {k[strip:]: v for k, v in teacher_sd.items()})
                torch.save(state, tmp / "trainer_state.pt")
                torch.save(rngs, tmp / "rng_states.pt")
                info = {"model": self.family.name, "mode": "lora" if self.lora else "aux",
                        "step": self.step, "config": self.cfg.to_dict()}
                (tmp / "twinflow_train.json").write_text(json.dumps(info, indent=1))

            try:
                path = ckpt.write(self.ckpt_root, self.step, writer)
                ckpt.prune(self.ckpt_root, self.cfg.training.keep_last)
            except ValueError as e:  # disk full: every rank stops with the same one-line error
                path = e
        self.d.barrier()
        path = self.d.broadcast_object(path)
        if isinstance(path, ValueError):
            raise path
        self.last_checkpoint = path
        return self.last_checkpoint

    def load(self, path: pathlib.Path) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state = ckpt.load_state(path / "trainer_state.pt")
        marked = ckpt.marker_step(path)
        if not isinstance(state, dict) or state.get("step") != marked:
            raise ValueError(f"checkpoint {path}: trainer_state.pt holds step "
                             f"{state.get('step') if isinstance(state, dict) else '?'}, {ckpt.MARKER} says {marked}; "
                             "refusing to load it")
        if (state["world"] * state["batch_size"] * state["accum"]
                != self.d.world * self.cfg.training.batch_size * self.accum):
            raise ValueError(f"checkpoint {path}: written with a global batch of {state['world']} processes × "
                             f"{state['batch_size']} × {state['accum']} accumulation steps; this run has "
                             f"{self.d.world} × {self.cfg.training.batch_size} × {self.accum}; "
                             "resume with the same global batch")
        opts = StateDictOptions(full_state_dict=True)
        transformer = self.raw.transformer
        if self.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(transformer, ckpt.load_peft_weights(path / "lora"), adapter_name=ONLINE_ADAPTER)
            if self.teacher is not None:
                set_peft_model_state_dict(transformer, ckpt.load_peft_weights(path / "lora_teacher"),
                                          adapter_name=TEACHER_ADAPTER)
            transformer.set_adapter(ONLINE_ADAPTER)
        else:
            sd = {"transformer." + k: v for k, v in ckpt.load_diffusers_weights(path / "transformer").items()}
            set_model_state_dict(self.model, sd, options=opts)
            if self.teacher is not None:
                sd = {"transformer." + k: v for k, v in ckpt.load_diffusers_weights(path / "transformer_ema").items()}
                set_model_state_dict(self.teacher.module, sd, options=opts)
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=opts)
        self.sched.load_state_dict(state["lr_scheduler"])
        self.loss_fn.load_state_dict(state["loss_fn"])
        self.step, self.data_pass, self.used_in_pass = state["step"], state["data_pass"], state["used_in_pass"]
        rngs = ckpt.load_state(path / "rng_states.pt")
        if len(rngs) == self.d.world:
            ckpt.set_rng_state(rngs[self.d.rank])
        self.last_checkpoint = path

    # ------------------------------------------------------------------ samples

    @torch.no_grad()
    def sample_grid(self) -> Optional[pathlib.Path]:
        """Collective under FSDP2 (every rank runs the model); rank 0 decodes and writes."""
        from twinflow import UnifiedSampler

        from .data import collate

        if self.strategy != "fsdp" and not self.d.main:
            return None
        s = self.cfg.sampling
        n = min(s.num_images, len(self.dataset))
        batch = collate([self.dataset[i] for i in range(n)])
        x, cond, _ = self._batch(batch, 0, 0)
        g = torch.Generator(self.d.device).manual_seed(s.seed)
        noise = torch.randn(x.shape, generator=g, device=self.d.device)
        net = self.model if self.strategy == "fsdp" else self.raw
        was_training = net.training
        net.eval()
        try:
            with torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                latents = UnifiedSampler(**s.sampler_kwargs()).sample(net, noise, generator=g, cond=cond)
        finally:
            net.train(was_training)
        if not self.d.main or self.vae is None:
            return None
        path = self.out / "samples" / f"step-{self.step:06d}.png"
        pixels = self.family.decode_latents(self.vae, latents.float())
        if pixels.dim() == 5:  # clips [N, 3, F, H, W]: one row per clip, at most 8 frames evenly spread
            keep = torch.linspace(0, pixels.shape[2] - 1, min(pixels.shape[2], 8)).round().long()
            save_grid(pixels[:, :, keep.to(pixels.device)].transpose(1, 2).flatten(0, 1), path, cols=len(keep))
        else:
            save_grid(pixels, path)
        return path

    # ------------------------------------------------------------------ export

    def export_pipeline(self) -> Optional[pathlib.Path]:
        """Rank 0 (collective gather first): ``<output>/pipeline``, the base pipeline folder with
        the trained transformer in the published layout (aux keys inside its safetensors; LoRA
        merged into the weights), recording backbone and mode (``twinflow.saved_format``: it
        loads with ``twinflow.load_pipeline(path)``); for LoRA also ``<output>/lora``, the
        adapter in diffusers' LoRA layout (``twinflow.lora_files``), where the pipeline class
        has diffusers' LoRA loader (not OpenUni)."""
        from .. import _files, lora_files
        from ..saved_format import mark_model_index

        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        base = pathlib.Path(self.cfg.model.pretrained_model_name_or_path)
        transformer = self.raw.transformer
        if self.lora:
            sd = None
            if self.d.main:
                merged = _merged_lora_state_dict(transformer)
        else:
            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dest = self.out / "pipeline"
        if self.d.main:
            tmp = self.out / "pipeline.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            # parts TwinFlow does not use (Wan 2.2 A14B's second expert) are not copied
            unused = self.family.unused_components(_files.read_json(base / "model_index.json"))
            skip = ["transformer", *unused]
            shutil.copytree(base, tmp, ignore=lambda d, names: skip if pathlib.Path(d) == base else [])
            weights = merged if self.lora else {k[len("transformer."):]: v for k, v in sd.items()}
            ckpt.save_diffusers(tmp / "transformer", transformer, weights)  # its config holds the record
            mark_model_index(tmp / "model_index.json", self.family.name, "lora" if self.lora else "aux", unused)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            if self.lora and lora_files.supported(self.family.name):  # OpenUni: the merged export only
                shutil.rmtree(self.out / "lora", ignore_errors=True)
                lora_files.save(self.out / "lora", transformer, ONLINE_ADAPTER, self.family.name)
        self.d.barrier()
        return dest

    # ------------------------------------------------------------------ loop

    def fit(self) -> Dict[str, float]:
        from tqdm.auto import tqdm

        t = self.cfg.training
        if self.d.main and self.cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                logger.warning("logging.tensorboard: tensorboard is not installed; logging to metrics.jsonl only")
        self.model.train()
        batches = self.micro_batches()
        global_batch = t.batch_size * self.accum * self.d.world
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.d.main and self.progress),
                   desc="twinflow train", dynamic_ncols=True)
        metrics = (self.out / "metrics.jsonl").open("a") if self.d.main else None
        stats: Dict[str, float] = {}
        try:
            while self.step < self.total_steps:
                start = time.perf_counter()
                stats = self.train_step(batches)
                elapsed = time.perf_counter() - start
                stats.update(step=self.step, epoch=(self.step - 1) // self.steps_per_epoch,
                             images_per_s=global_batch / elapsed, memory_mib=_memory_mib(self.d.device))
                if metrics is not None:
                    metrics.write(json.dumps(stats) + "\n")
                    metrics.flush()
                    if self.tb is not None:
                        for k, v in stats.items():
                            self.tb.add_scalar(f"train/{k}", v, self.step)
                # This step's numbers (tqdm redraws at its own pace): never a stale loss.
                bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.4g}", img_s=f"{stats['images_per_s']:.3g}",
                                mem=f"{stats['memory_mib']:.0f}MiB", refresh=False)
                bar.update(1)
                if self.step % t.checkpoint_every == 0 or self.step == self.total_steps:
                    self.save()
                if self.step % t.sample_every == 0 or self.step == self.total_steps:
                    self.sample_grid()
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            if self.tb is not None:
                self.tb.close()
        self.export_pipeline()
        return stats


def _merged_lora_state_dict(transformer) -> Dict[str, torch.Tensor]:
    """The transformer's weights with the online LoRA adapter merged in (W + ΔW from peft's
    ``get_delta_weight``), under the stock key names, on the CPU: one layer at a time, so no
    second copy of a large model is made."""
    from peft.tuners.lora import LoraLayer

    from ..quantization import dequantized_state_dict

    # a QLoRA base is dequantized: the export is the function that was trained (base as the
    # adapter saw it, plus the adapter), in plain tensors
    plain = dequantized_state_dict(transformer)
    out = {k.replace(".base_layer.", "."): v.cpu() for k, v in plain.items() if "lora_" not in k}
    with torch.no_grad():
        for name, m in transformer.named_modules():
            if isinstance(m, LoraLayer) and ONLINE_ADAPTER in m.lora_A:
                w = plain[f"{name}.base_layer.weight"]
                out[f"{name}.weight"] = (w.float() + m.get_delta_weight(ONLINE_ADAPTER).float()).to(w.dtype).cpu()
    return out


def make_optimizer(t, params, device) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (``training.optimizer: adamw8bit``: its state in 8 bits,
    a quarter of AdamW's; CUDA only)."""
    kw = dict(lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    if device.type != "cuda":
        raise ValueError(f"training.optimizer: adamw8bit (bitsandbytes) runs on CUDA only, not on {device.type}; "
                         "use adamw")
    from twinflow.quantization import require_backend

    require_backend("bitsandbytes")
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **kw)
