"""Train MetricGold: ``python training/train.py --config training/configs/X.yaml --output DIR``.

Stages, each resumable with ``--resume`` (``DIR`` keeps everything):

0. Synthetic data named in ``data.generate`` is rendered into ``DIR/data/<name>/`` (Virtual
   KITTI 2 layout, read back by the real loader).
1. ``model.tiny`` only: the tiny VAE learns RGB and log-depth (``training/vae_stage.py``) and
   is written to ``DIR/vae/``; its depth reconstruction AbsRel goes into ``metrics.json``.
2. The UNet learns v-prediction of the depth latent with pyramid noise and a valid-pixel mask
   (``training/recipe.py``), or with ``train.objective: e2e_ft`` the single-step E2E-FT
   objective (t = T, zero depth latent, loss on the VAE-decoded depth); the VAE is frozen,
   or only its encoder with ``train.train_decoder``.
   ``accelerate`` does devices, mixed precision and gradient accumulation
   (``accelerate launch --config_file training/accelerate/1node_8gpu.yaml training/train.py
   ...`` for several GPUs or nodes); the effective batch is logged at start and checked
   against ``train.effective_batch_size``.
   Every ``train.checkpoint_every`` steps ``DIR/checkpoints/step_NNNNNN/`` receives the
   accelerator state (UNet, Adam, LR schedule, RNGs, EMA), ``progress.json`` (step, data
   position, curves) and ``model/``, a checkpoint the node loads; the newest one is resumed.
   Their size, and the disk's free space, are logged at the start (a warning when short);
   ``train.checkpoint_every: null`` writes none.

At the end: ``DIR/final/`` (the model, EMA weights when ``train.ema``; hard links to the last
checkpoint's ``model/`` where the file system allows), ``DIR/metrics.json``
(``val_abs_rel_start``/``_end``, loss and validation curves, VAE stage numbers) and
TensorBoard logs in ``DIR/logs/``.
"""

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or '.').resolve() == _ROOT / 'training':
    sys.path[0] = str(_ROOT)  # run as a script: import `training.*`, not a bare `datasets`
elif str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metricgold_ros.atomic import replace_path  # noqa: E402
from metricgold_ros.errors import MetricGoldError  # noqa: E402
from metricgold_ros.model.checkpoint import ModelMetadata, save_checkpoint  # noqa: E402
from metricgold_ros.model.single_step import predict_x0_single_step  # noqa: E402
from training import data as train_data  # noqa: E402
from training.config import (  # noqa: E402
    Config, ConfigError, load_config, resolve_accumulation)
from training.models import Components, load_components, load_trained_vae  # noqa: E402
from training.progress import (  # noqa: E402
    PROGRESS_FILE, check_checkpoint_disk, checkpoint_bytes, checkpoint_folder, fmt,
    latest_checkpoint, link_final, rotate_checkpoints, setup_logging, summarize)
from training.recipe import (  # noqa: E402
    WarmupExponentialDecay, annealed_strength, border_weights, decoded_depth, latent_valid_mask,
    masked_gradient_loss, masked_mse, multi_res_noise_like, sample_timesteps, velocity_target)
from training.state import (  # noqa: E402,F401 - load_training_state: also this module's API
    load_training_state, nonfinite_weights, save_extra_state)
from training.validation import constant_baseline, make_checkpoint, validate  # noqa: E402
from training.vae_stage import (  # noqa: E402
    depth_as_image, depth_reconstruction_metrics, fit_scaling_factor, train_vae)

LOGGER = logging.getLogger('metricgold.train')
MAX_NONFINITE_STEPS = 3  # steps in a row with a NaN/inf loss before the run stops


class Run:
    """One invocation of the trainer on an output folder."""

    def __init__(self, config: Config, output: Path, resume: bool,
                 stop_at_step: Optional[int] = None, *,
                 trust_pickled_state: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        self.config, self.output, self.resume = config, output, resume
        self.stop_at_step = stop_at_step  # tests and drills: return after this step
        self.trust_pickled_state = trust_pickled_state  # --resume of an older run's pickles
        # Validation and saving run on the main process while the others wait at a barrier:
        # the collective timeout must outlast them (NCCL's default is 10 minutes).
        timeout = InitProcessGroupKwargs(
            timeout=timedelta(seconds=config.train.distributed_timeout_s))
        self.accelerator = Accelerator(mixed_precision=config.train.mixed_precision,
                                       kwargs_handlers=[timeout])
        accumulation = resolve_accumulation(config.train, self.accelerator.num_processes)
        config.train.gradient_accumulation_steps = accumulation
        self.accelerator.gradient_accumulation_steps = accumulation
        self.device = self.accelerator.device
        if self.device.type == 'cpu' and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        set_seed(config.seed)
        self.wall = {'data': 0.0, 'vae_stage': 0.0, 'unet_stage': 0.0, 'validation': 0.0}
        self.writer = None
        self.effective_batch = (config.train.batch_size * accumulation *
                                self.accelerator.num_processes)
        if config.tensorboard and self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(output / 'logs'))

    # -- stages ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        start = time.perf_counter()
        with self.accelerator.main_process_first():
            if self.accelerator.is_main_process:
                train_data.generate_synthetic(self.config.data, self.output)
        self.val_items = train_data.load_validation_items(self.config.data.val)
        self.baseline = None
        if self.val_items:
            frames = train_data.make_train_batches(self.config.data, 1, self.config.seed).frames
            self.baseline = constant_baseline(frames, self.val_items)
            LOGGER.info('constant baseline (training median %.2f m): AbsRel %.4f',
                        self.baseline['depth_m'], self.baseline['abs_rel'])
        self.wall['data'] += time.perf_counter() - start

    def vae_stage(self, parts: Components) -> dict:
        """Train (or, when resuming, reload) the tiny VAE; returns its metrics."""
        cfg, folder = self.config.vae_stage, self.output / 'vae'
        report_path = folder / 'vae_stage.json'
        if not report_path.is_file():
            start = time.perf_counter()
            untrained = self._metrics(make_checkpoint(
                parts.unet, parts.vae, parts.scheduler_config, parts.empty_text_embedding,
                self._metadata(parts)))
            batches = self._batch_stream(cfg.batch_size, self.config.seed + 1)
            report = train_vae(parts.vae, batches, cfg, parts.d_min_m, parts.d_max_m,
                               self.config.seed, self.device, self.writer)
            report['scaling_factor'] = fit_scaling_factor(
                parts.vae, batches, cfg.scale_batches, parts.d_min_m, parts.d_max_m,
                self.device)
            report['val_untrained'] = untrained
            items = self.val_items[:cfg.val_images]
            if items:
                report.update(depth_reconstruction_metrics(
                    parts.vae, items, parts.d_min_m, parts.d_max_m, self.device))
            if self.accelerator.is_main_process:
                if folder.exists():
                    shutil.rmtree(folder)
                parts.vae.save_pretrained(str(folder), safe_serialization=True)
                report_path.write_text(json.dumps(report) + '\n')
            self.accelerator.wait_for_everyone()
            self.wall['vae_stage'] += time.perf_counter() - start
            LOGGER.info('vae stage: depth AbsRel %.4f after encode/decode, scaling factor %.4f',
                        report.get('depth_abs_rel', float('nan')), report['scaling_factor'])
        parts.vae = load_trained_vae(folder, self.device)  # one path for fresh and resumed runs
        return json.loads(report_path.read_text())

    def unet_stage(self, parts: Components, vae_report: Optional[dict]) -> dict:
        """Fine-tune the UNet (and the decoder with ``train.train_decoder``) for ``train.steps``;
        the progress record."""
        from torch.utils.data import DataLoader

        cfg, acc = self.config.train, self.accelerator
        optimizer, lr_scheduler = self._prepare_unet(parts)
        progress = {'step': 0, 'loss': [], 'lr': [], 'val': [], 'vae': vae_report,
                    'baseline': self.baseline}
        latest = latest_checkpoint(self.output / 'checkpoints') if self.resume else None
        if latest is not None:
            load_training_state(acc, latest, self.ema, self.device, lr_scheduler,
                                trust_pickled_state=self.trust_pickled_state)
            progress = json.loads((latest / PROGRESS_FILE).read_text())
            LOGGER.info('resumed from %s at step %d', latest, progress['step'])
        elif cfg.steps > 0:
            self._validate(progress)
        batches = train_data.make_train_batches(self.config.data, cfg.batch_size,
                                                self.config.seed)
        loader = DataLoader(batches, batch_size=None, num_workers=self.config.data.num_workers,
                            sampler=train_data.BatchNumbers(
                                progress['step'], cfg.steps, cfg.gradient_accumulation_steps,
                                acc.process_index, acc.num_processes),
                            pin_memory=self.device.type == 'cuda')
        data_iter = iter(loader)
        start = time.perf_counter()
        skipped_in_a_row = 0
        for step in range(progress['step'], cfg.steps):
            finite, step_loss = self._train_step(data_iter, optimizer)
            progress['lr'].append(lr_scheduler.get_last_lr()[0])
            lr_scheduler.step()
            if not finite:
                skipped_in_a_row = self._skip_step(progress, step + 1, skipped_in_a_row)
            else:
                skipped_in_a_row = 0
                if self.ema is not None:
                    self.ema.step(self._trained_parameters())
            progress['loss'].append(float(acc.reduce(step_loss, 'mean')) if finite else None)
            progress['step'] = done = step + 1
            progress['data_position'] = {'seed': self.config.seed, 'position': (
                done * cfg.gradient_accumulation_steps * acc.num_processes)}
            if done % cfg.log_every == 0 or done == cfg.steps:
                self._log_step(progress, done)
            if done % self.config.validation.every == 0 or done == cfg.steps:
                self.wall['unet_stage'] += time.perf_counter() - start
                self._validate(progress)
                start = time.perf_counter()
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                self._save_state(progress)
            if done == self.stop_at_step:
                LOGGER.warning('stopping after step %d as asked (--stop-at-step)', done)
                self.wall['unet_stage'] += time.perf_counter() - start
                return progress
        self.wall['unet_stage'] += time.perf_counter() - start
        self._save_final()
        return progress

    def _prepare_unet(self, parts: Components) -> Tuple[Any, Any]:
        """Networks on the device, optimizer, LR schedule and EMA; the optimizer and schedule."""
        from diffusers import DDIMScheduler
        from diffusers.training_utils import EMAModel

        cfg, acc = self.config.train, self.accelerator
        unet = parts.unet.to(self.device).train().requires_grad_(True)
        self.vae = parts.vae.to(self.device).eval().requires_grad_(False)
        if cfg.train_decoder:
            if acc.num_processes > 1:
                raise ConfigError('train.train_decoder: fine-tuning the decoder runs in one '
                                  f'process; this run has {acc.num_processes}')
            for param in self._decoder_parameters():
                param.requires_grad_(True)
        if self.config.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if cfg.objective == 'e2e_ft':  # the loss backpropagates through the decoder
                self.vae.enable_gradient_checkpointing()
        self.parts = parts
        self.latent_cache = {} if self.config.data.cache_latents else None
        ddim = DDIMScheduler.from_config(parts.scheduler_config)
        ddim.set_timesteps(self.config.model.denoising_steps)
        self.sampling_timesteps = ddim.timesteps.clone()  # what inference will visit
        optimizer = torch.optim.Adam([*unet.parameters(), *self._decoder_parameters()],
                                     lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)
        schedule = WarmupExponentialDecay(cfg.warmup_steps, cfg.decay_steps or cfg.steps,
                                          cfg.final_lr_ratio)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.unet, optimizer = acc.prepare(unet, optimizer)
        if cfg.train_decoder:  # registered, so that checkpoints save and --resume restores it
            self.vae = acc.prepare(self.vae)
        # Stepped by hand, once per optimizer step; saved as JSON by training/state.py (never
        # registered with accelerate, which would pickle it and unpickle it on --resume).
        self.lr_scheduler = lr_scheduler
        self.ema = None
        if cfg.ema:
            self.ema = EMAModel(self._trained_parameters(), decay=cfg.ema_decay)
            self.ema.to(self.device)
        self.metadata = self._metadata(parts)
        if acc.is_main_process:
            check_checkpoint_disk(self.output, *checkpoint_bytes(unet, self.vae, cfg.ema),
                                  cfg.keep_checkpoints if cfg.checkpoint_every else None)
        return optimizer, lr_scheduler

    def _train_step(self, data_iter: Any, optimizer: Any) -> Tuple[bool, torch.Tensor]:
        """One optimizer step over the accumulated micro-batches: (every loss finite on every
        rank, the step's mean loss). A non-finite step changes no weight."""
        cfg, acc = self.config.train, self.accelerator
        step_loss = torch.zeros((), device=self.device)
        finite = True  # every micro-batch's loss, on every rank
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(data_iter)
            with acc.accumulate(self.unet):
                loss = self._loss(batch)
                finite = finite and self._finite_everywhere(loss)
                if finite:
                    acc.backward(loss)
                if acc.sync_gradients and not finite:  # the whole step is dropped
                    optimizer.zero_grad(set_to_none=True)
                elif finite:
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.unet.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if finite:
                step_loss += loss.detach() / cfg.gradient_accumulation_steps
        return finite, step_loss

    def _log_step(self, progress: dict, done: int) -> None:
        """The loss and learning rate of the last log window (log and TensorBoard)."""
        cfg = self.config.train
        recent = [x for x in progress['loss'][-cfg.log_every:] if x is not None] \
            or [float('nan')]  # every step of the window was skipped
        LOGGER.info('step %d/%d: loss %.4f, lr %.2e', done, cfg.steps,
                    float(np.mean(recent)), progress['lr'][-1])
        if self.writer is not None:
            self.writer.add_scalar('train/loss', float(np.mean(recent)), done)
            self.writer.add_scalar('train/lr', progress['lr'][-1], done)

    def _save_final(self) -> None:
        """``final/``: a link to the last checkpoint's model, else the model saved there."""
        cfg, acc = self.config.train, self.accelerator
        if acc.is_main_process:
            last = checkpoint_folder(self.output / 'checkpoints', cfg.steps) / 'model'
            if not (cfg.checkpoint_every and last.is_dir() and
                    link_final(last, self.output / 'final')):
                self._with_ema(lambda: save_checkpoint(self.output / 'final',
                                                       self._checkpoint(), overwrite=True))
        acc.wait_for_everyone()

    # -- pieces --------------------------------------------------------------------------------

    def _batch_stream(self, batch_size: int, seed: int):
        batches = train_data.make_train_batches(self.config.data, batch_size, seed)
        k = 0
        while True:
            yield batches[k]
            k += 1

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every process (one all-reduce: all ranks agree)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        return float(self.accelerator.reduce(bad, 'sum')) == 0.0

    def _skip_step(self, progress: dict, step: int, in_a_row: int) -> int:
        """A step whose loss was NaN/inf on some rank was dropped (no update, no EMA step);
        after :data:`MAX_NONFINITE_STEPS` in a row the run stops with what to change."""
        in_a_row += 1
        progress.setdefault('skipped_steps', []).append(step)
        LOGGER.warning('step %d: the loss is NaN/inf (on at least one process): the step is '
                       'skipped, no weights changed (%d in a row)', step, in_a_row)
        if in_a_row >= MAX_NONFINITE_STEPS:
            last = latest_checkpoint(self.output / 'checkpoints')
            raise MetricGoldError(
                f'the loss was NaN/inf in {in_a_row} steps in a row (last: step {step}); the '
                'run is stopped. Lower train.lr, use mixed_precision bf16 instead of fp16, or '
                'check the data for broken frames; '
                + (f'--resume continues from {last.name}' if last else 'no checkpoint was '
                   'written yet'))
        return in_a_row

    def _loss(self, batch: dict) -> torch.Tensor:
        """The configured objective's loss on one micro-batch."""
        parts = self.parts
        rgb = batch['rgb'].to(self.device)  # [B,3,H,W]
        depth_m = canonical_depth(batch['depth_m'], batch.get('focal_px'),
                                  self.config.model.canonical_focal_px)
        depth, valid = depth_as_image(depth_m, batch['valid'], parts.d_min_m, parts.d_max_m)
        depth, valid = depth.to(self.device), valid.to(self.device)  # [B,3,H,W], [B,1,H,W]
        # [B,4,h,w] each (no depth latent for e2e_ft, which compares decoded depth)
        rgb_latent, depth_latent = self._encode(rgb, depth, batch['views'])
        if self.config.train.objective == 'e2e_ft':
            return self._e2e_ft_loss(rgb_latent, depth, valid)
        return self._diffusion_loss(batch, rgb_latent, depth_latent, valid)

    def _e2e_ft_loss(self, rgb_latent: torch.Tensor, depth: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """E2E-FT: one step at t = T from a zero depth latent, masked MSE of the decoded depth.

        The predicted x0 goes through the frozen VAE decoder (gradients reach the UNet through
        it); the loss compares the decoded codec value with the target's, in [-1, 1] log depth,
        on the valid pixels only (those within ``train.border_px`` of the edge weighted
        ``train.border_weight``), plus ``train.gradient_loss_weight`` times the multi-scale
        gradient matching of the same values (:func:`masked_gradient_loss`).
        """
        text = self.parts.empty_text_embedding.to(self.device)  # [1,T,C]
        with self.accelerator.autocast():
            # The pipeline's own single step (one implementation for training and inference).
            x0 = predict_x0_single_step(self.unet, self.parts.noise_scheduler, rgb_latent,
                                        text)  # [B,4,h,w]
            prediction = decoded_depth(self.vae, x0)  # [B,1,H,W]
        target, cfg = depth[:, :1].float(), self.config.train
        weights = None if cfg.border_weight == 1.0 else border_weights(
            *target.shape[-2:], cfg.border_px, cfg.border_weight).to(target.device)
        loss = masked_mse(prediction, target, valid, weights)
        if cfg.gradient_loss_weight:
            loss = loss + cfg.gradient_loss_weight * masked_gradient_loss(
                prediction, target, valid, cfg.gradient_loss_scales)
        return loss

    def _diffusion_loss(self, batch: dict, rgb_latent: torch.Tensor,
                        depth_latent: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Masked v-prediction MSE of one micro-batch (Marigold's training step)."""
        parts, cfg = self.parts, self.config.train
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [self.config.seed, int(batch['k'])]).generate_state(1)[0]))
        steps = parts.noise_scheduler.config.num_train_timesteps
        timesteps = sample_timesteps(len(rgb_latent), steps, generator, self.sampling_timesteps,
                                     cfg.sampling_timestep_p)
        if cfg.multi_res_noise > 0:
            strength = annealed_strength(timesteps, steps, cfg.multi_res_noise) \
                if cfg.annealed_noise else cfg.multi_res_noise
            noise = multi_res_noise_like(depth_latent, strength, generator)
        else:
            noise = torch.randn(depth_latent.shape, generator=generator).to(depth_latent)
        timesteps = timesteps.to(self.device)
        noisy = parts.noise_scheduler.add_noise(depth_latent, noise, timesteps)
        target = velocity_target(parts.noise_scheduler, depth_latent, noise, timesteps)
        text = parts.empty_text_embedding.to(self.device).expand(len(rgb_latent), -1, -1)
        prediction = self.unet(torch.cat([rgb_latent, noisy], dim=1), timesteps,
                               encoder_hidden_states=text).sample  # [B,4,h,w]
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return masked_mse(prediction, target, latent_valid_mask(valid, factor))

    @torch.no_grad()
    def _encode(self, rgb: torch.Tensor, depth: torch.Tensor,
                views: list) -> tuple:
        """RGB and depth latents (frozen VAE, posterior mode, scaled), cached per view.

        The RGB latent (an input) is encoded under the run's mixed precision, the depth latent
        (the target) in float32 (:func:`encode_latents`); ``e2e_ft`` compares decoded depth
        and needs no depth latent (None). With ``data.cache_latents`` every sample is encoded
        on its own, the first time its view (frame, window, flip) appears, so a resumed run
        gets the very same numbers.
        """
        if self.config.train.objective == 'e2e_ft':
            depth = None
        if self.latent_cache is None:
            return encode_latents(self.vae, rgb, depth, self.accelerator.autocast)
        latents = []
        for i, view in enumerate(views):
            key = tuple(int(v) for v in view)
            if key not in self.latent_cache:
                self.latent_cache[key] = encode_latents(
                    self.vae, rgb[i:i + 1], None if depth is None else depth[i:i + 1],
                    self.accelerator.autocast)
            latents.append(self.latent_cache[key])  # ([1,4,h,w], [1,4,h,w] or None)
        rgb_latent = torch.cat([pair[0] for pair in latents])  # [B,4,h,w]
        if depth is None:
            return rgb_latent, None
        return rgb_latent, torch.cat([pair[1] for pair in latents])

    def _checkpoint(self):
        parts = self.parts
        return make_checkpoint(self.accelerator.unwrap_model(self.unet), self.vae,
                               parts.scheduler_config, parts.empty_text_embedding,
                               self.metadata)

    def _decoder_parameters(self) -> list:
        """The VAE weights that ``train.train_decoder`` fine-tunes: post_quant_conv and the
        decoder (none without it)."""
        if not self.config.train.train_decoder:
            return []
        return [*self.vae.post_quant_conv.parameters(), *self.vae.decoder.parameters()]

    def _trained_parameters(self) -> list:
        """What the optimizer and the EMA update: the UNet's weights, then the decoder's."""
        return [*self.accelerator.unwrap_model(self.unet).parameters(),
                *self._decoder_parameters()]

    def _with_ema(self, action):
        """Run ``action`` with the EMA weights swapped into the UNet (and the decoder, when it
        trains), if EMA is on."""
        if self.ema is None:
            return action()
        params = self._trained_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            return action()
        finally:
            self.ema.restore(params)

    def _metadata(self, parts: Components) -> ModelMetadata:
        model = self.config.model
        return ModelMetadata(parts.d_min_m, parts.d_max_m, model.denoising_steps,
                             model.processing_resolution,
                             canonical_focal_px=model.canonical_focal_px,
                             e2e_ft=self.config.train.objective == 'e2e_ft').validate('model')

    def _metrics(self, checkpoint, image_count: int = 0):
        """Validation metrics of ``checkpoint`` (main process; others get None)."""
        if not self.val_items:
            return None
        start = time.perf_counter()
        result = None
        if self.accelerator.is_main_process:
            val, model = self.config.validation, self.config.model
            result = validate(
                checkpoint, self.val_items, self.device,
                denoising_steps=val.denoising_steps or model.denoising_steps,
                ensemble_size=val.ensemble_size,
                processing_resolution=val.processing_resolution or model.processing_resolution,
                image_count=image_count)
        self.accelerator.wait_for_everyone()
        self.wall['validation'] += time.perf_counter() - start
        return result if image_count else (result[0] if result else None)

    def _validate(self, progress: dict) -> None:
        if not self.val_items:
            return
        count = self.config.validation.log_images if self.writer is not None else 0
        result = self._with_ema(lambda: self._metrics(self._checkpoint(), max(count, 1)))
        if result is None:  # not the main process
            return
        metrics, images = result
        progress['val'].append({'step': progress['step'], **metrics})
        LOGGER.info('validation at step %d: AbsRel %.4f, delta1 %.4f', progress['step'],
                    metrics['abs_rel'], metrics['delta1'])
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f'val/{key}', value, progress['step'])
            for index, image in enumerate(images[:count]):
                self.writer.add_image(f'val/depth_{index}', image, progress['step'],
                                      dataformats='HWC')
            self.writer.flush()

    def _save_state(self, progress: dict) -> None:
        """Accelerator state + LR schedule and EMA (no pickles) + progress + a loadable model,
        renamed into place when complete and on disk; never of NaN/inf weights."""
        acc, folder = self.accelerator, self.output / 'checkpoints'
        final = checkpoint_folder(folder, progress['step'])
        bad = nonfinite_weights(acc.unwrap_model(self.unet), self.ema)  # same on every rank
        if bad:
            last = latest_checkpoint(folder)
            raise MetricGoldError(
                f'step {progress["step"]}: the weights hold NaN/inf ({", ".join(bad)}); no '
                'checkpoint is written and none is deleted. Lower train.lr or use bf16 instead '
                'of fp16; ' + (f'--resume continues from {last.name}' if last else
                               'no earlier checkpoint exists'))
        tmp = folder / f'.{final.name}.tmp'
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            if acc.is_main_process:
                save_extra_state(tmp, self.lr_scheduler, self.ema)
                self._with_ema(lambda: save_checkpoint(tmp / 'model', self._checkpoint()))
                (tmp / PROGRESS_FILE).write_text(json.dumps(progress) + '\n')
        except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise MetricGoldError(
                f'the checkpoint of step {progress["step"]} could not be written to {tmp} '
                f'({type(err).__name__}: {str(err)[:200]}); '
                f'{shutil.disk_usage(folder).free / 1e9:.1f} GB free there. Free space, lower '
                'train.keep_checkpoints, or set train.checkpoint_every: null') from err
        if acc.is_main_process:
            replace_path(tmp, final)  # synced; an old one moved aside until this is in place
            rotate_checkpoints(folder, self.config.train.keep_checkpoints, final)
        acc.wait_for_everyone()


def encode_latents(vae: torch.nn.Module, rgb: torch.Tensor, depth: Optional[torch.Tensor],
                   autocast) -> tuple:
    """Scaled posterior-mode latents ``([B,4,h,w], [B,4,h,w])`` of ``rgb`` and ``depth``.

    RGB is encoded inside ``autocast()`` (the run's mixed precision: the latent is a network
    input); depth in float32 with autocast off, because its latent is the regression target and
    bf16 would quantise it to 8 significant bits. Both come back as float32; with ``depth``
    None the second is None.
    """
    scale = float(vae.config.scaling_factor)
    depth_latent = None
    with torch.no_grad():
        with autocast():
            rgb_latent = vae.encode(rgb).latent_dist.mode().float() * scale
        if depth is not None:
            with torch.autocast(device_type=depth.device.type, enabled=False):
                depth_latent = vae.encode(depth.float()).latent_dist.mode().float() * scale
    return rgb_latent, depth_latent


def canonical_depth(depth_m: torch.Tensor, focal_px, canonical_focal_px: Optional[float]
                    ) -> torch.Tensor:
    """Depth targets ``[B,1,H,W]`` in the canonical camera: ``depth * f_c / f`` per sample.

    ``focal_px`` holds each sample's focal length (px) at the training resolution; with
    ``canonical_focal_px`` None, ``depth_m`` is returned unchanged (plain metric training).
    Invalid pixels (0) stay 0.
    """
    if canonical_focal_px is None:
        return depth_m
    if focal_px is None or any(f is None or not f > 0 for f in focal_px):
        raise MetricGoldError(f'model.canonical_focal_px: a training sample has focal length '
                              f'{focal_px!r}; camera-aware training needs every dataset to '
                              'give intrinsics (or set canonical_focal_px: null)')
    ratio = canonical_focal_px / torch.as_tensor(focal_px, dtype=torch.float32)
    return depth_m * ratio.reshape(-1, 1, 1, 1).to(depth_m)


def train(config_path: Path, output: Path, *, resume: bool = False,
          stop_at_step: Optional[int] = None,
          trust_pickled_state: bool = False) -> Optional[dict]:
    """Run (or continue) the training ``config_path`` describes into ``output``.

    Returns the ``metrics.json`` content, or None when stopped early by ``stop_at_step``.
    """
    started = time.perf_counter()
    output = Path(output)
    config = load_config(config_path, output.resolve())
    if not resume and ((output / 'checkpoints').exists() or (output / 'final').exists()):
        raise MetricGoldError(f'--output {output} already holds a run; pass --resume to '
                              'continue it, or choose an empty folder')
    output.mkdir(parents=True, exist_ok=True)
    run = Run(config, output, resume, stop_at_step, trust_pickled_state=trust_pickled_state)
    setup_logging(output, run.accelerator.is_main_process)
    LOGGER.info('training %s into %s on %s (%s precision)', config_path, output, run.device,
                config.train.mixed_precision)
    LOGGER.info('effective batch %d = %d per device x %d accumulated x %d process(es)%s',
                run.effective_batch, config.train.batch_size,
                config.train.gradient_accumulation_steps, run.accelerator.num_processes,
                '' if config.train.effective_batch_size is None else ' (as configured)')
    if run.accelerator.is_main_process:
        (output / 'config.json').write_text(json.dumps(dataclasses.asdict(config), indent=2))
    run.prepare_data()
    parts = load_components(config.model, config.seed)
    vae_report = run.vae_stage(parts) if config.model.tiny else None
    progress = run.unet_stage(parts, vae_report)
    if stop_at_step is not None and progress['step'] < config.train.steps:
        return None
    summary = summarize(progress, run.config, run.wall, time.perf_counter() - started)
    if run.accelerator.is_main_process:
        (output / 'metrics.json').write_text(json.dumps(summary, indent=1) + '\n')
        LOGGER.info('done in %.0f s: val AbsRel %s -> %s, loss %.4f -> %.4f; model in %s',
                    summary['wall_time_s']['total'], fmt(summary['val_abs_rel_start']),
                    fmt(summary['val_abs_rel_end']), summary['loss_start'] or 0.0,
                    summary['loss_end'] or 0.0, output / 'final')
    if run.writer is not None:
        run.writer.close()
    run.accelerator.end_training()
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Train a MetricGold model (see '
                                                 'training/configs/*.yaml).')
    parser.add_argument('--config', required=True, type=Path, help='YAML training config')
    parser.add_argument('--output', required=True, type=Path, help='run folder')
    parser.add_argument('--resume', action='store_true',
                        help='continue the run in --output from its newest checkpoint')
    parser.add_argument('--trust-pickled-state', action='store_true',
                        help='with --resume: allow a checkpoint of an older version whose '
                             'LR schedule and EMA are pickled (loading a pickle runs any code '
                             'it holds: only for run folders you made yourself)')
    parser.add_argument('--stop-at-step', type=int, default=None,
                        help='for tests and drills: stop after this step as if killed')
    args = parser.parse_args(argv)
    try:
        train(args.config, args.output, resume=args.resume, stop_at_step=args.stop_at_step,
              trust_pickled_state=args.trust_pickled_state)
    except MetricGoldError as err:
        print(f'ERROR: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
