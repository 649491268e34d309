"""Full fine-tuning recipe: what one training worker does, top to bottom setup -> train -> save_checkpoint ->
cleanup (torchtune's shape).

It runs inside each Ray Train worker (`trainer.launch`, with `trainer.contexts.RayContext`), or without Ray at
world size 1 (`trainer.contexts.LocalContext`, used by `bench/train_throughput.py` and the packing tests), with
the same DeepSpeed engine, data collation and attention path either way.

Loss: cross-entropy over response tokens only (`trainer.model`), normalised by the number of response tokens in
the whole optimizer step across all workers and micro-batches (every worker knows it from the shared epoch plan,
so it costs no communication).

Elsewhere: resource preflight `trainer.memory`, MFU `trainer.mfu`, metrics `trainer.metrics`, checkpoint
files `trainer.checkpointing`, Hugging Face export `trainer.export`, time limits `trainer.watchdog`, SIGTERM
`trainer.preemption`, live progress `trainer.progress`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import random
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from trainer import checkpointing
from trainer import progress as progress_report
from trainer.config import ConfigError, TrainConfig, deepspeed_config
from trainer.data.packing import EpochPlan, collate_packed, collate_padded, plan_epoch, shard_batches
from trainer.export import copy_tokenizer, save_hf_folder
from trainer.failures import FatalError
from trainer.fault_injection import _test_kill, _test_oom, _test_stall
from trainer.log import datasets_progress_bars, get_logger
from trainer.memory import check_gpu_memory, check_volume, checkpoint_bytes
from trainer.metrics import MetricLogger
from trainer.mfu import measure_peak_flops, mfu
from trainer.model import CausalLMWithResponseLoss, decays, restore_fp32_rope, set_checkpointed_layers
from trainer.preemption import Preempted, StopOnSigterm
from trainer.prompt import IGNORE_INDEX
from trainer.watchdog import Watchdog, default_limits

log = get_logger(__name__)


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    tokens_seen: int = 0
    # The LR schedule's length, fixed when the run started (`_schedule_steps`); None in older checkpoints.
    schedule_steps: int | None = None


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warm, decay, floor = cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if decay == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
        return floor + (1 - floor) * shape

    return fn


class FullFinetuneRecipe:
    def __init__(self, cfg: TrainConfig, ctx):
        self.cfg = cfg
        self.ctx = ctx
        if cfg.scaling.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("scaling.use_gpu is true but this worker sees no CUDA device")
        self.is_main = ctx.rank == 0

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, train_examples: list[dict] | None = None, val_examples: list[dict] | None = None) -> None:
        self.setup_limit_s, self.step_limit_s = default_limits(self.cfg)
        self.watchdog = Watchdog(self.ctx.rank)
        self._seed_everything(self.cfg.seed + self.ctx.rank)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cfg.scaling.use_gpu else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cfg.model.precision == "bf16" else torch.float32
        with self.phase("process group", self.setup_limit_s):
            if self.ctx.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank is up and the rendezvous works
        with self.phase("data load", self.setup_limit_s):
            self._setup_data(train_examples, val_examples)
        self.ds_config = deepspeed_config(self.cfg)
        with self.phase("checkpoint lookup", self.setup_limit_s):
            resume_from = self.ctx.latest_checkpoint()
        # A weights-only checkpoint holds the model as a Hugging Face folder: build the model from it.
        weights_only = resume_from is not None and not (resume_from / "deepspeed").is_dir()
        self.weights_path = str(resume_from / "hf") if weights_only else self.cfg.model.path
        self.schedule_steps = self._schedule_steps(resume_from)
        self._preflight_resources()
        with self.phase("model build", self.setup_limit_s):
            model = self._setup_model()
        # the model's size is known now: limits scaled by it
        self.setup_limit_s, self.step_limit_s = default_limits(self.cfg, self.n_params)
        with self.phase("deepspeed.initialize", self.setup_limit_s):
            self._setup_engine(model)
        self.progress = Progress(schedule_steps=self.schedule_steps)
        self._fingerprint = 0
        with self.phase("resume", self.setup_limit_s):
            self._maybe_resume(resume_from)
        self.peak_flops = self._peak_flops()
        self.metrics = MetricLogger(self.cfg, enabled=self.is_main)
        self.metrics.log("preflight", {"step": self.progress.global_step, "parameters": self.n_params,
                                       **{f"mem_estimate_{k}": v for k, v in self.memory_estimate.as_dict().items()},
                                       "checkpoint_bytes_estimate": self.checkpoint_bytes})

    def _preflight_resources(self) -> None:
        """Before the model is built: refuse a config that clearly cannot fit the GPU or the volume
        (trainer/memory.py)."""
        cfg = self.cfg
        self.memory_estimate, n_params = check_gpu_memory(cfg, self.ctx.world_size, self.device, self.is_main)
        self.checkpoint_bytes = checkpoint_bytes(n_params, cfg.checkpoint.save_optimizer_state, cfg.model.precision,
                                                 cfg.deepspeed.stage)
        if cfg.lora.enabled:  # LoRA: the checkpoint holds the adapter + its optimizer state only
            from trainer import lora

            self.checkpoint_bytes = checkpoint_bytes(lora.trainable_count(cfg), True, cfg.model.precision, 2)
        run_dir = getattr(self.ctx, "run_dir", None)
        if self.is_main and run_dir is not None:
            check_volume(cfg, run_dir, self.checkpoint_bytes)

    # ---- time limits (trainer/watchdog.py) --------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, limit_s: float) -> Iterator[None]:
        with self.watchdog.phase(name, limit_s):
            _test_stall(name, self.ctx.rank)
            yield

    def _peak_flops(self) -> float | None:
        """The MFU denominator: a matmul rate measured on GPUs, averaged over the ranks so every rank reports the
        same MFU. None on CPUs: no known peak, so no MFU is reported."""
        if self.device.type != "cuda":
            return None
        peak = torch.tensor(measure_peak_flops(self.device, self.dtype), device=self.device)
        return self._all_reduce(peak).item() / self.ctx.world_size

    def _setup_data(self, train_examples, val_examples) -> None:
        if train_examples is None:
            from datasets import load_from_disk

            datasets_progress_bars()
            root = Path(self.cfg.data.path) / "tokenized"
            train_examples = load_from_disk(str(root / "train")).select_columns(["id", "input_ids", "labels"]).to_list()
            val_examples = load_from_disk(str(root / "validation")).select_columns(["id", "input_ids", "labels"]).to_list()
        self.train_examples = train_examples
        self.val_examples = val_examples or []
        self.lengths = [len(e["input_ids"]) for e in train_examples]
        self.n_labels = [sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in train_examples]
        too_long = [i for i, n in enumerate(self.lengths) if n > self.cfg.data.max_length]
        if too_long:
            raise ConfigError(
                f"{len(too_long)} training examples exceed data.max_length={self.cfg.data.max_length} "
                f"(longest {max(self.lengths)}); re-run `dolly-train prepare --max-length` with the same length"
            )
        self.accum = self.cfg.batch.gradient_accumulation_steps
        multiple = self.ctx.world_size * self.accum
        plan = self._plan(0)
        self.steps_per_epoch = len(plan.batches) // multiple
        full = self.steps_per_epoch * self.cfg.schedule.epochs
        self.total_steps = self.cfg.schedule.max_steps or full

    def _schedule_steps(self, ckpt: Path | None) -> int:
        """The LR schedule's length in optimizer steps. It is fixed when a run starts and kept in every checkpoint:
        a resume that changes `schedule.max_steps` or `schedule.epochs` changes where the run stops, never the LR
        curve (re-stretching a cosine mid-run made the LR jump). Past the planned length the LR stays at its
        final value (`min_lr_ratio` x lr); a shorter run stops part-way down the curve."""
        if ckpt is None:
            return self.total_steps
        planned = json.loads((ckpt / "progress.json").read_text()).get("schedule_steps")
        if planned is None and (ckpt / "config.yaml").is_file():  # written before the length was recorded
            import yaml

            old = (yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("schedule", {})
            planned = old.get("max_steps") or self.steps_per_epoch * old.get("epochs", self.cfg.schedule.epochs)
        planned = planned or self.total_steps
        if planned != self.total_steps and self.is_main and self.cfg.schedule.decay != "constant":
            after = (f"steps {planned + 1}-{self.total_steps} run at the schedule's final LR "
                     f"({self.cfg.schedule.min_lr_ratio:g} x optim.lr)" if self.total_steps > planned
                     else "it stops before the LR has decayed to its final value")
            log.warning(f"the run's length changed on resume: it now ends at step {self.total_steps}, but the LR "
                        f"schedule keeps the {planned} steps planned when the run started ({ckpt / 'progress.json'}): "
                        f"{after}. For a new curve, start a new run (another checkpoint.run_name).")
        return planned

    def _plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.lengths, self.cfg.data.max_length, self.cfg.data.packing,
                          self.cfg.batch.micro_batch_size, self.cfg.seed, epoch,
                          self.ctx.world_size * self.cfg.batch.gradient_accumulation_steps)

    def _setup_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        # Keep this object alive: while it exists, from_pretrained/from_config build the model under
        # deepspeed.zero.Init for ZeRO-3, so no rank ever holds the whole model.
        self._hf_ds = HfDeepSpeedConfig(self.ds_config) if self.cfg.deepspeed.stage == 3 else None
        if self.cfg.lora.enabled:  # LoRA: the frozen base, 4-bit for QLoRA (trainer/lora.py)
            from trainer import lora

            model = lora.load_base(self.cfg, self.weights_path, self.dtype, self.device)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                self.weights_path, dtype=self.dtype, attn_implementation=self.cfg.model.attn_implementation)
        model.config.use_cache = False
        restore_fp32_rope(model)
        # from_pretrained returns the model in eval mode, and transformers applies activation checkpointing
        # only in training mode (`self.gradient_checkpointing and self.training`): without this, the
        # checkpointing preset silently kept every activation and ran out of memory on the GPU.
        model.train()
        if self.cfg.model.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            set_checkpointed_layers(model, self.cfg.model.activation_checkpointing_layers)
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        if self.cfg.lora.enabled:  # LoRA: adapters injected in place; only they train
            model, self.peft_model = lora.wrap(model, self.cfg)
        return CausalLMWithResponseLoss(model, self.cfg.model.attn_implementation)

    def _setup_engine(self, model: torch.nn.Module) -> None:
        from trainer import ds_ops

        ds_ops.prepare(self.cfg)  # before deepspeed.comm starts: no run-time op build, no lock waits
        import deepspeed

        o = self.cfg.optim
        trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter only
        decay = [p for p in trained if decays(p)]
        no_decay = [p for p in trained if not decays(p)]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.cfg.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
        else:
            fused = self.device.type == "cuda"
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused,
                                          foreach=None if fused else True)
        schedule = lr_lambda(self.cfg, self.schedule_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config,
            dist_init_required=False if torch.distributed.is_initialized() else None,
        )
        if self.cfg.model.compile != "none":
            # In place (nn.Module.compile): parameter names, checkpoints and the export are unchanged.
            # With "compile": {"deepcompile": true} in the DeepSpeed config this selects DeepCompile.
            self.engine.compile()

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ---- resume ------------------------------------------------------------------------------
    def _maybe_resume(self, ckpt: Path | None) -> None:
        if ckpt is None:
            return
        if (ckpt / "config.yaml").is_file():  # refuse a resume that would reinterpret the saved position
            checkpointing.check_resume(ckpt / "config.yaml", self.cfg.to_dict(), self.cfg.checkpoint.run_name)
        if (ckpt / "deepspeed").is_dir():
            path, _ = self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state",
                                                  load_optimizer_states=True, load_lr_scheduler_states=True,
                                                  # LoRA: the checkpoint holds only the adapter
                                                  load_module_strict=not self.cfg.lora.enabled)
            if path is None:
                raise RuntimeError(f"{ckpt}: no DeepSpeed state could be loaded")
        else:  # weights-only: the model came from <ckpt>/hf in setup; the LR schedule continues, Adam restarts
            self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
            # LambdaLR.load_state_dict restores the scheduler's counters but not the fresh optimizer's lr, which
            # still holds the schedule's step-0 value: without this the first resumed step ran at that LR.
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
            if self.is_main:
                log.info(f"{ckpt} is a weights-only checkpoint: Adam's moments restart from zero")
        self.progress = Progress(**json.loads((ckpt / "progress.json").read_text()))
        self.progress.schedule_steps = self.schedule_steps
        rng = ckpt / f"rng_rank{self.ctx.rank}.pt"
        if rng.exists():
            state = torch.load(rng, weights_only=False)
            random.setstate(state["python"])
            np.random.set_state(state["numpy"])
            torch.set_rng_state(state["torch"])
            if state.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])
        if self.is_main:
            log.info(f"resumed from {ckpt} at step {self.progress.global_step} "
                     f"(epoch {self.progress.epoch}, step {self.progress.step_in_epoch} of {self.steps_per_epoch})")
        self._resumed_from = str(ckpt)

    # ---- one optimizer step ------------------------------------------------------------------
    def step_batches(self, plan: EpochPlan, step_in_epoch: int) -> tuple[list[dict], int, int]:
        """This worker's micro-batches for a step, the step's global label-token count and real tokens."""
        W, A = self.ctx.world_size, self.accum
        lo, hi = step_in_epoch * W * A, (step_in_epoch + 1) * W * A
        step_batches = plan.batches[lo:hi]  # all workers' micro-batches of this step
        global_labels = sum(self.n_labels[i] for b in step_batches for row in b for i in row)
        mine = shard_batches(step_batches, self.ctx.rank, W)
        micro = [self.collate(b, self.train_examples) for b in mine]
        real = sum(self.lengths[i] for b in mine for row in b for i in row)
        # crc of the whole step's example indices, in order: lets a resumed run prove it saw the same data
        self._fingerprint = zlib.crc32(repr(step_batches).encode(), self._fingerprint)
        return micro, global_labels, real

    def collate(self, rows: list[list[int]], examples: list[dict]) -> dict:
        """Packed rows fill max_length; padded rows (one example each) pad to the longest in the batch."""
        if self.cfg.data.packing:
            return collate_packed([[examples[i] for i in row] for row in rows], self.cfg.data.max_length)
        return collate_padded([examples[i] for row in rows for i in row])

    def train_step(self, micro: list[dict], global_labels: int) -> dict:
        W, A = self.ctx.world_size, self.accum
        # DeepSpeed divides by A (gradient accumulation) and averages over W workers; undo both so the
        # step's gradient is the mean over every response token of the global batch.
        scale = W * A / max(global_labels, 1)
        # the LR this step's update uses (the scheduler moves it on at the step's last micro-batch)
        self.step_lr = self.scheduler.optimizer.param_groups[0]["lr"]
        loss_total = torch.zeros((), device=self.device)
        for mb in micro:
            mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            loss, _ = self.engine(mb["input_ids"], mb["labels"], mb["position_ids"], mb["doc_ids"], scale)
            self.engine.backward(loss)
            self.engine.step()
            loss_total += loss.detach()
        return {"loss_scaled_sum": loss_total}

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        self._sigterm = StopOnSigterm(self.ctx.rank).install()  # trainer/preemption.py
        try:
            self._train_loop()
        finally:
            self._sigterm.uninstall()

    def _stop_requested(self) -> bool:
        """Any rank got SIGTERM: all ranks learn it after the same step (one all-reduce of one number)."""
        flag = torch.tensor(1.0 if self._sigterm.requested.is_set() else 0.0, device=self.device)
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    def _stop_for_restart(self, last_ckpt_step: int) -> None:
        p = self.progress
        if last_ckpt_step != p.global_step:
            self.save_checkpoint()
        raise Preempted(f"rank {self.ctx.rank}: stopped on SIGTERM after step {p.global_step} and saved "
                        f"checkpoint_{p.global_step:08d}; the restarted run resumes from it")

    def _train_loop(self) -> None:
        cfg, p = self.cfg, self.progress
        last_ckpt_step = p.global_step if getattr(self, "_resumed_from", None) else -1
        bar = self._progress_bar()
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
        loss_acc = torch.zeros((), device=self.device)
        while p.global_step < self.total_steps:
            plan = self._plan(p.epoch)
            while p.step_in_epoch < self.steps_per_epoch and p.global_step < self.total_steps:
                micro, global_labels, real = self.step_batches(plan, p.step_in_epoch)
                with self.phase(f"optimizer step {p.global_step + 1}", self.step_limit_s):
                    _test_oom(p.global_step + 1, self.ctx.rank)
                    _test_kill(p.global_step + 1, self.ctx.rank)
                    out = self.train_step(micro, global_labels)
                loss_acc += out["loss_scaled_sum"] / (self.ctx.world_size * self.accum)
                p.step_in_epoch += 1
                p.global_step += 1
                window_tokens += real
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                if p.global_step % cfg.logging.every_steps == 0 or p.global_step == self.total_steps:
                    window_t, window_tokens, window_steps, loss_acc = self._log_train(
                        plan, window_t, window_tokens, window_steps, loss_acc, bar)
                # validation and checkpoints are timed apart: tokens/s is the training rate alone
                paused = time.perf_counter()
                if p.global_step % cfg.logging.eval_every_steps == 0 and p.global_step < self.total_steps:
                    self._log_eval()
                if p.global_step % cfg.checkpoint.every_steps == 0 and p.global_step < self.total_steps:
                    self.save_checkpoint()
                    last_ckpt_step = p.global_step
                window_t += time.perf_counter() - paused
                if p.global_step < self.total_steps and self._stop_requested():
                    self._stop_for_restart(last_ckpt_step)
            if p.step_in_epoch >= self.steps_per_epoch:
                p.epoch += 1
                p.step_in_epoch = 0
        # The final checkpoint first: a failure or a hang in the last validation then loses nothing.
        if last_ckpt_step != p.global_step:
            self.save_checkpoint(final=True)
        self._log_eval()
        if bar is not None:
            bar.close()

    def _progress_bar(self):
        if not self.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.progress.global_step, desc="train", unit="step",
                    disable=None, dynamic_ncols=True)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def _log_train(self, plan, window_t, window_tokens, window_steps, loss_acc, bar):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - window_t
        tokens = self._all_reduce(torch.tensor(float(window_tokens), device=self.device)).item()
        loss = self._all_reduce(loss_acc.clone()).item() / max(window_steps, 1)
        tps = tokens / elapsed
        p = self.progress
        p.tokens_seen += int(tokens)
        grad_norm = self.engine.get_global_grad_norm()
        mfu_now = mfu(self.n_params, tps, self.peak_flops, self.ctx.world_size)
        m = {
            "step": p.global_step,
            "epoch": p.epoch + p.step_in_epoch / max(self.steps_per_epoch, 1),
            "loss": loss,
            "lr": self.step_lr,  # the last step's (get_last_lr() is already the next step's)
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tps,
            "tokens_per_s_per_worker": tps / self.ctx.world_size,
            "mfu": mfu_now,
            "packing_efficiency": plan.efficiency,
            "step_time_s": elapsed / max(window_steps, 1),
            "tokens_seen": p.tokens_seen,
            "data_fingerprint": self._fingerprint,
        }
        self._fingerprint = 0
        if mfu_now is None:
            del m["mfu"]
        if self.device.type == "cuda":
            m["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.log("train", m)
        progress_report.report(self, "train", m)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{m['lr']:.2e}")
        self.ctx.report({k: v for k, v in m.items() if v is not None})
        return time.perf_counter(), 0, 0, torch.zeros((), device=self.device)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.val_examples:
            return None
        lengths = [len(e["input_ids"]) for e in self.val_examples]
        plan = plan_epoch(lengths, self.cfg.data.max_length, self.cfg.data.packing, self.cfg.batch.micro_batch_size,
                          seed=0, epoch=0, multiple=self.ctx.world_size)
        mine = shard_batches(plan.batches, self.ctx.rank, self.ctx.world_size)
        if self.cfg.logging.eval_max_batches:
            mine = mine[: self.cfg.logging.eval_max_batches]
        total = torch.zeros(2, device=self.device)
        self.engine.eval()
        for rows in mine:
            mb = {k: v.to(self.device) for k, v in self.collate(rows, self.val_examples).items()}
            loss_sum, n = self.engine(mb["input_ids"], mb["labels"], mb["position_ids"], mb["doc_ids"], 1.0)
            total += torch.stack([loss_sum.float(), n.float()])
        self.engine.train()
        if self.cfg.deepspeed.stage == 3:
            # A forward-only pass leaves ZeRO-3's parameters gathered (no backward ends with the release); the
            # validation now comes last in train(), after the final checkpoint, so without this the whole model
            # stays materialized on every rank into the export (and the export's LoRA gather test sees no
            # partitioned placeholders). Every rank runs this, like the validation itself.
            self.engine.empty_partition_cache()
        self._all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    def _log_eval(self) -> None:
        with self.phase("validation", self.setup_limit_s):
            val = self.evaluate()
        if val is not None:
            self.metrics.log("eval", {"step": self.progress.global_step, "val_loss": val})
            progress_report.report(self, "eval", {"step": self.progress.global_step, "val_loss": val})

    # ---- checkpoints and export --------------------------------------------------------------
    def save_checkpoint(self, final: bool = False) -> None:
        p = self.progress
        name = f"checkpoint_{p.global_step:08d}"
        t0 = time.perf_counter()
        with self.phase("checkpoint save", self.setup_limit_s), self.ctx.checkpoint_dir(name) as d:
            self._write_checkpoint(d)
            if self.ctx.world_size > 1:
                torch.distributed.barrier()
            if self.is_main:  # written last: its presence means every rank's files are complete
                checkpointing.write_manifest(d, p.global_step, self.ctx.world_size)
        save_s = time.perf_counter() - t0
        m = {"step": p.global_step, "checkpoint": name, "save_seconds": save_s, "final": final}
        self.metrics.log("checkpoint", m)
        progress_report.report(self, "checkpoint", m)
        self.ctx.report({"step": p.global_step, "checkpoint_save_s": save_s}, checkpoint=d)

    def _write_checkpoint(self, d: Path) -> None:
        """Every rank's share of a checkpoint. A full volume fails the run naming the path and the bytes needed;
        the partial folder is removed (it has no manifest, so a resume would skip it anyway)."""
        p = self.progress
        previous = checkpointing.checkpoints(d.parent) if self.ctx.run_dir is not None else []
        previous = [c for c in previous if c.name != d.name and (c / checkpointing.MANIFEST).is_file()]
        needed = checkpointing.size_of(previous[-1]) if previous else None
        if needed:
            checkpointing.check_free_space(d, needed)
        try:
            if self.cfg.checkpoint.save_optimizer_state:
                # LoRA: the adapter and its optimizer state only; the frozen base is rebuilt from model.path
                self.engine.save_checkpoint(str(d / "deepspeed"), tag="state",
                                            exclude_frozen_parameters=self.cfg.lora.enabled)
            else:
                self._save_weights_only(d)
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
            torch.save(rng, d / f"rng_rank{self.ctx.rank}.pt")
            if self.is_main:
                (d / "progress.json").write_text(json.dumps(p.__dict__, indent=2))
                (d / "config.yaml").write_text(self.cfg.to_yaml())
                if self.cfg.checkpoint.save_optimizer_state:  # weights-only wrote a whole HF folder already
                    model = self.engine.module.model
                    model.config.save_pretrained(d / "hf")
                    if model.generation_config is not None:
                        model.generation_config.save_pretrained(d / "hf")
                    copy_tokenizer(self.cfg.model.path, d / "hf")
        except (OSError, RuntimeError) as e:
            # torch.save reports a full disk as RuntimeError ("file write failed"), plain writes as ENOSPC
            full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e) \
                or shutil.disk_usage(d).free < 16 * 2**20
            if not full:
                raise
            written = checkpointing.size_of(d)
            shutil.rmtree(d, ignore_errors=True)
            raise FatalError(checkpointing.enospc_message(d, needed or None, written=written)) from e

    def _save_weights_only(self, d: Path) -> None:
        """A weights-only checkpoint: the training-dtype weights as a Hugging Face folder (<d>/hf) and the
        LR scheduler; with progress and RNG (written by the caller) that is what a resume needs."""
        self._export(d / "hf")  # inside the 'checkpoint save' phase
        if self.is_main:
            torch.save(self.scheduler.state_dict(), d / "scheduler.pt")

    def export(self, out: str | Path) -> Path | None:
        """Consolidated Hugging Face folder (all ranks must call: ZeRO-3 gathers the shards), under the watchdog
        like every other phase: a rank that never joins the gather would hang the others."""
        with self.phase("export", self.setup_limit_s):
            return self._export(out)

    def _export(self, out: str | Path) -> Path | None:
        module = self.engine.module
        lora_on = self.cfg.lora.enabled
        if self.cfg.deepspeed.stage == 3:  # LoRA: gather the adapter only (never the 0-element placeholders)
            state = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora_on)
        else:
            state = module.state_dict() if self.is_main else None
        if not self.is_main:
            return None
        # Building the export skeleton must not go through zero.Init (a collective the other ranks are no
        # longer in): drop the HF-DeepSpeed link first.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self._hf_ds = None
        unset_hf_deepspeed_config()
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if lora_on:  # LoRA: <out>-adapter (PEFT layout) + <out> merged into the base weights (trainer/lora.py)
            from trainer import lora

            probe = torch.tensor([self.val_examples[0]["input_ids"][:256]]) if self.val_examples else None
            return lora.export_adapter_and_merged(
                self.cfg, lora.adapter_state(state), out, tokenizer_from=self.cfg.model.path,
                generation_config=module.model.generation_config, probe_ids=probe)[1]
        return save_hf_folder(module.model.config, state, out, tokenizer_from=self.cfg.model.path,
                              generation_config=module.model.generation_config)

    def cleanup(self) -> None:
        progress_report.close(self)
        if hasattr(self, "watchdog"):
            self.watchdog.close()
        if hasattr(self, "metrics"):  # setup may have failed before the logger existed
            self.metrics.close()
