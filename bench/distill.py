"""``logitcache bench distill``: does a student learn as well from the cache as from the teacher?

With the demo teacher and its language, one small student, from one initial state, is trained for
the same steps on the same batches in the same order, three ways:

(a) cross-entropy on the text only;
(b) online distillation: the teacher (transformers, fp32, in this process, no grad) computes its
    full distribution at every position of every batch, loss = the dense divergence over the whole
    vocabulary (``--loss``, forward KL by default), optionally mixed with CE (``--alpha``);
(c) distillation from the cache: a real ``logitcache serve`` captures the training sequences (as
    token ids, so they are exactly (a)'s and (b)'s) in a precompute job, and the student trains
    from ``TeacherStream`` (gRPC, ``shuffle=False`` so the order is (a)'s, checked batch by batch)
    through ``collate_records`` and the sparse top-k loss of ``logitcache.trainer.losses``.

(a') is (a) computed the fused way (:func:`~logitcache.trainer.losses.fused_cross_entropy` inside
the student's output layer, no [B, T, V] logits), the baseline the distillation runs are compared
with: (c), (d) and (e) use the fused losses too (``fused_distillation_loss``); ``--modes l`` adds
(l), (c)'s loss on full logits. ``--student-vocab`` pads the student's output layer beyond the
teacher's vocabulary (e.g. 65536), the large-vocabulary case where the fused path matters: the
extra tokens are outside every cached row, so they sit in the tail bucket.

The results table has, per run, the student's step time (forward, loss, backward, optimizer
step; data and teacher excluded) in ms and relative to (a') and (a), the peak memory of one step
above what it starts with (the profiler's allocation events on CPU, where tracemalloc sees none of
torch's tensors; ``torch.cuda.max_memory_allocated`` on GPU) relative to (a'), and positions
trained per second. These come from :func:`measure_steps`, after training: steps of every run
interleaved on each run's first batch, so that the ratios hold on a machine shared with others.

The training sequences come from :func:`token_sequences` (documents of the demo language), or
with ``--data FILE`` from :func:`data_token_sequences` (the texts of a JSONL file, such as the
real-text teacher's held-out texts: the last blocks held out, the rest for training).

``--modes t`` adds two runs at ``--temperature`` T (default 2) on the top-k rows, both with the
exact tempered loss of ``logitcache.trainer.tempered`` on full logits: (t) from a second server job
that also stores each position's tail mass at T (``temperatures=[T]``), so the loss is exact over
the top-k plus the tail; (u) from (c)'s cache, which has no tails at T, with the documented
approximation (``approximate=True``: the top-k renormalised at T, the tail dropped).

Each student is then scored on held-out text (documents of another seed) by the mean
KL(teacher || student) per token over the full vocabulary, with the teacher computed by the plain
transformers reference forward pass, by its perplexity on the actual next tokens, and by the same
KL between the tempered distributions at T, ``softmax(logits / T)`` of both (no T^2 factor): what
the runs at T are trained to match.

(c) also reports its input side: the wall time the training loop spent waiting for data (inside
``next()`` on the record iterator, plus collation) against the time in forward/backward/step, so
positions/s consumed from the stream can be read next to the student's own step rate.

Threads: the server (vLLM engine process and gRPC server) runs for the whole benchmark, so the
three runs see the same machine (it is left to go idle after the capture job before each run).
The trainer uses ``--threads`` torch threads (default 1) in all three runs, which leaves a core to
the server's streaming and the stream's prefetch thread during (c). Measured on a shared 2-core
machine, 60 steps: 2 threads made every run 3-6x slower than 1 (oversubscribed cores), with the
same held-out figures. No engine is built in this process: vLLM runs only in the server's
subprocess.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from logitcache.client.errors import InvalidArgument
from logitcache.client.use import Use
from logitcache.demo.assets import demo_teacher_path
from logitcache.trainer import losses
from logitcache.trainer.collate import TeacherTargets, collate_records
from logitcache.trainer.output_layer import loss_in_output_layer, output_layer
from logitcache.trainer.stream import TeacherStream
from logitcache.trainer.tempered import tempered_batch_loss

IGNORE_INDEX = -100
EVAL_BATCH = 32
T = TypeVar("T")


# ---- data ----------------------------------------------------------------------------------------


def token_sequences(tokenizer, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """int64 [count, seq_len]: ``<s> doc </s>`` streams of documents of ``seed``, cut into blocks."""
    from logitcache.demo.language import generate_documents

    eos = tokenizer.eos_token_id
    need = count * seq_len
    documents = 64
    while True:
        encoded = tokenizer(generate_documents(documents, seed=seed))["input_ids"]
        stream = [t for ids in encoded for t in (*ids, eos)]
        if len(stream) >= need:
            return torch.tensor(stream[:need], dtype=torch.int64).view(count, seq_len)
        documents = math.ceil(documents * 1.2 * need / max(len(stream), 1)) + 1


def data_token_sequences(
    teacher: str, data: str, count: int, held_out: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [count, seq_len], held-out [held_out, seq_len]) int64 from the texts of ``data``,
    run together and cut into blocks: the last ``held_out`` blocks are held out, the others are
    the training blocks, repeated in order when ``count`` asks for more of them."""
    from logitcache.bench.storage import data_sequences

    blocks = torch.from_numpy(np.stack(data_sequences(teacher, data, 1 << 30, seq_len)))
    if blocks.shape[0] <= held_out:
        raise InvalidArgument(
            f"--data {data} has {blocks.shape[0]} blocks of {seq_len} tokens; it needs more than "
            f"--eval-sequences ({held_out})"
        )
    train = blocks[: blocks.shape[0] - held_out].long()
    repeated = train.repeat(-(-count // train.shape[0]), 1)[:count]
    return repeated, blocks[blocks.shape[0] - held_out :].long()


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[:, t] = input_ids[:, t + 1]; IGNORE_INDEX at the last position (collate's layout)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def batch_rows(step: int, batch_size: int, count: int) -> torch.Tensor:
    """Rows of step ``step``: the sequences in order, wrapping into the next epoch."""
    return (step * batch_size + torch.arange(batch_size)) % count


# ---- student ---------------------------------------------------------------------------------------


def student_config(vocab_size: int, seq_len: int, hidden: int, layers: int):
    from transformers import LlamaConfig

    heads = max(1, hidden // 32)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=True,
        dtype="float32",
    )


def learning_rate_factor(step: int, steps: int) -> float:
    """Linear warm-up over 10% of the steps, then cosine decay to a tenth."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


# ---- losses ----------------------------------------------------------------------------------------


def _weighted_log_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum a (log a - log b) over the last dim, 0 log 0 = 0 (a student vocabulary padded beyond
    the teacher's gives the teacher -inf there)."""
    present = log_a > float("-inf")
    diff = torch.where(present, log_a - log_b, 0.0)
    return (log_a.exp() * diff).sum(-1)


def dense_divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position divergence over the full vocabulary; teacher log_p, student log_q [..., V]."""
    if kind == "forward_kl":
        return _weighted_log_ratio(log_p, log_q)
    if kind == "reverse_kl":
        return _weighted_log_ratio(log_q, log_p)
    if kind == "jsd":  # beta = 0.5, as losses.jsd's default
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * _weighted_log_ratio(log_p, log_m) + 0.5 * _weighted_log_ratio(log_q, log_m)
    raise ValueError(f"unknown loss {kind!r}")


def pad_vocabulary(log_p: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher's log-probs over a student vocabulary of ``vocab`` >= its own (-inf beyond)."""
    extra = vocab - log_p.shape[-1]
    return log_p if extra == 0 else F.pad(log_p, (0, extra), value=float("-inf"))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    )


# A step's loss: (student, input_ids, attention_mask, labels, extra) -> loss; extra for the loss.
StepLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
# (logits [B, T, V], labels, extra) -> loss
LogitsLoss = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
# (hidden [B, T, H], output weight [V, H], bias, labels, extra) -> loss
HiddenLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, dict], torch.Tensor
]


def on_logits(loss: LogitsLoss) -> StepLoss:
    """The usual way: the student returns [B, T, V] logits, the loss takes them."""

    def step(model, input_ids, attention_mask, labels, extra):  # type: ignore[no-untyped-def]
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return loss(logits, labels, extra)

    return step


def fused(loss: HiddenLoss) -> StepLoss:
    """The fused way: the loss runs inside the student's output layer, on its hidden states."""

    def step(model, input_ids, attention_mask, labels, extra):  # type: ignore[no-untyped-def]
        head = output_layer(model)
        if head is None:
            raise RuntimeError("the student has no plain linear output layer to fuse the loss in")
        with loss_in_output_layer(head, lambda h, w, b: loss(h, w, b, labels, extra)) as scored:
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return scored.loss_from(outputs)

    return step


def step_peak_bytes(device: torch.device, run_step: Callable[..., T], *args: Any) -> tuple[int, T]:
    """Peak memory one training step allocates above what it starts with (the model, optimizer
    state and batch already held are not counted).

    On GPU ``torch.cuda.max_memory_allocated``. On CPU the profiler's allocation events, summed in
    time order: tracemalloc sees only Python's allocators, not torch's tensors."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = run_step(*args)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run_step(*args)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak, out


# ---- one training run -------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    model: torch.nn.Module
    wall_s: float = 0.0  # the whole loop
    data_s: float = 0.0  # waiting for the batch (slicing, or the stream's next() + collation)
    teacher_s: float = 0.0  # (b): the teacher's forward pass
    forward_s: float = 0.0  # the student's forward pass with the loss (fused: one and the same)
    update_s: float = 0.0  # backward, clipping, optimizer step
    positions: int = 0
    first_batch_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    server_cpu_s: float | None = None
    step_loss: StepLoss | None = None
    first_batch: Batch | None = None  # step 0's batch (with the teacher's output), for timing
    step_s: float = 0.0  # median of the interleaved timed steps (measure_steps)
    peak_bytes: int = 0  # of one step (step_peak_bytes)

    @property
    def compute_s(self) -> float:
        """The student's training work: forward, loss, backward, optimizer step."""
        return self.forward_s + self.update_s


# (input_ids [B, T], attention_mask, labels, extra); extra for the loss
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]
# A batch source: step -> its batch.
BatchFn = Callable[[int], Batch]
TIMING_ROUNDS = 12  # interleaved steps per run in measure_steps (the first one warms up)


def _train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    step_loss: StepLoss,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict],
    timing: RunResult | None = None,
) -> torch.Tensor:
    """One optimizer step; adds its forward (with the loss) and update times to ``timing``."""
    t0 = time.perf_counter()
    loss = step_loss(model, *batch)
    t1 = time.perf_counter()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    if timing is not None:
        timing.forward_s += t1 - t0
        timing.update_s += time.perf_counter() - t1
    return loss


def measure_steps(
    results: dict[str, RunResult], init: Callable[[], torch.nn.Module], lr: float
) -> None:
    """Each run's step time and peak memory, on its first batch, on fresh students.

    The runs' own timings are taken minutes apart on a machine that others share; these steps
    are interleaved (one step of each run in turn, TIMING_ROUNDS rounds, the median kept), so
    the ratios between runs hold under contention. The first round warms up (and makes the
    optimizer's state); the second is the one whose peak memory is taken, outside the timing.
    """
    steppers = {}
    for key in results:
        model = init()
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        steppers[key] = (model, optimizer, schedule)
    samples: dict[str, list[float]] = {key: [] for key in results}
    for round_ in range(TIMING_ROUNDS + 1):
        for key, r in results.items():
            assert r.step_loss is not None and r.first_batch is not None
            model, optimizer, schedule = steppers[key]
            args = (model, optimizer, schedule, r.step_loss, r.first_batch)
            if round_ == 1:
                device = next(model.parameters()).device
                r.peak_bytes, _ = step_peak_bytes(device, _train_step, *args)
                continue
            t0 = time.perf_counter()
            _train_step(*args)
            if round_ > 1:
                samples[key].append(time.perf_counter() - t0)
    for key, r in results.items():
        r.step_s = statistics.median(samples[key])


def train(
    name: str,
    init: Callable[[], torch.nn.Module],
    next_batch: BatchFn,
    step_loss: StepLoss,
    teacher_fn: Callable[[torch.Tensor, dict], None] | None,
    args: argparse.Namespace,
    server_cpu: Callable[[], float] | None,
) -> RunResult:
    model = init()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, args.steps)
    )
    result = RunResult(name, model, step_loss=step_loss)
    _settle(server_cpu)
    cpu0 = server_cpu() if server_cpu else None
    started = time.perf_counter()
    report_every = max(1, args.steps // 5)
    for step in range(args.steps):
        t0 = time.perf_counter()
        input_ids, attention_mask, labels, extra = next_batch(step)
        t1 = time.perf_counter()
        if step == 0:
            result.first_batch_s = t1 - t0
        if teacher_fn is not None:
            teacher_fn(input_ids, extra)
        t2 = time.perf_counter()
        batch = (input_ids, attention_mask, labels, extra)
        if step == 0:
            result.first_batch = batch
        loss = _train_step(model, optimizer, schedule, step_loss, batch, result)
        result.positions += int(attention_mask.sum())
        result.data_s += t1 - t0
        result.teacher_s += t2 - t1
        result.losses.append(float(loss.detach()))
        if (step + 1) % report_every == 0 or step + 1 == args.steps:
            window = result.losses[-report_every:]
            print(
                f"  {name} step {step + 1:>5}/{args.steps}: loss {sum(window) / len(window):.4f}"
                f"  ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    result.wall_s = time.perf_counter() - started
    if server_cpu is not None and cpu0 is not None:
        result.server_cpu_s = server_cpu() - cpu0
    model.eval()
    return result


# ---- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_logprobs(teacher: torch.nn.Module, held_out: torch.Tensor) -> list[torch.Tensor]:
    """The reference forward pass's log-probabilities [b, T, V] per evaluation batch."""
    return [
        torch.log_softmax(teacher(input_ids=batch).logits.float(), -1)
        for batch in held_out.split(EVAL_BATCH)
    ]


class HeldOut(NamedTuple):
    """A model's held-out scores: mean KL(teacher || model) per position over the full
    vocabulary at T = 1, perplexity on the actual next tokens, and the KL at ``temperature``."""

    kl: float
    ppl: float
    kl_tempered: float


def tempered_kl(log_p: torch.Tensor, log_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position KL(p_T || q_T) over the full vocabulary, p_T = softmax(log p / T): the
    teacher's exact tempered distribution (log-probs at T = 1 divided by T and renormalised are
    the logits divided by T), no T^2 factor."""
    return dense_divergence(
        torch.log_softmax(log_p / temperature, -1),
        torch.log_softmax(log_q / temperature, -1),
        "forward_kl",
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    held_out: torch.Tensor,
    reference: list[torch.Tensor],
    temperature: float,
) -> HeldOut:
    """The scores of ``model`` on ``held_out`` against the teacher's ``reference`` log-probs."""
    model.eval()
    kl_sum, kl_t_sum, nll_sum, kl_n, nll_n = 0.0, 0.0, 0.0, 0, 0
    for batch, log_p in zip(held_out.split(EVAL_BATCH), reference, strict=True):
        log_q = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
        log_p = pad_vocabulary(log_p, log_q.shape[-1])
        kl = dense_divergence(log_p, log_q, "forward_kl")
        kl_sum += float(kl.double().sum())
        kl_t_sum += float(tempered_kl(log_p, log_q, temperature).double().sum())
        kl_n += kl.numel()
        nll = -log_q[:, :-1].gather(-1, batch[:, 1:, None])[..., 0]
        nll_sum += float(nll.double().sum())
        nll_n += nll.numel()
    return HeldOut(kl_sum / kl_n, math.exp(nll_sum / nll_n), kl_t_sum / kl_n)


def print_results(
    rows: list[tuple[str, HeldOut, RunResult | None]],
    fused_ce: RunResult,
    ce: RunResult,
    positions: int,
    temperature: float,
) -> None:
    """The results table: held-out quality, then the student's step against a CE step's."""
    kl_t = f"KL@T{temperature:g}"
    head = (
        f"{'method':37s} {'KL(t||s)':>9s} {'ppl':>8s} {kl_t:>8s} {'step ms':>8s} {'x CE':>6s} "
        f"{'x CE(a)':>8s} {'peak MB':>8s} {'x CE':>6s} {'pos/s trained':>14s}"
    )
    print(head)
    print("-" * len(head))
    for label, scores, r in rows:
        quality = f"{label:37s} {scores.kl:>9.4f} {scores.ppl:>8.3f} {scores.kl_tempered:>8.4f}"
        if r is None:
            print(quality)
            continue
        print(
            f"{quality} {1000 * r.step_s:>8.1f} "
            f"{r.step_s / fused_ce.step_s:>6.2f} {r.step_s / ce.step_s:>8.2f} "
            f"{r.peak_bytes / 2**20:>8.1f} {r.peak_bytes / max(fused_ce.peak_bytes, 1):>6.2f} "
            f"{positions / r.step_s:>14,.0f}"
        )
    print(
        "(step ms: the student's forward, loss, backward and optimizer step on one batch, data "
        f"and teacher excluded, median of {TIMING_ROUNDS} interleaved with the other runs' "
        "(measure_steps); x CE: against (a'), a cross-entropy step computed the same fused way; "
        "x CE(a): against (a), cross-entropy on full logits; peak MB: one step above what it "
        "starts with, from the profiler's allocation events on CPU, max_memory_allocated on GPU; "
        f"{kl_t}: KL(teacher || student) between their distributions at T = {temperature:g} over "
        "the full vocabulary, no T^2 factor)"
    )


# ---- the server side ---------------------------------------------------------------------------------


def _server_cpu_reader(pid: int) -> Callable[[], float] | None:
    """CPU seconds of the server process and its children (the engine), if psutil is installed."""
    try:
        import psutil
    except ImportError:
        return None

    def read() -> float:
        try:
            proc = psutil.Process(pid)
            total = sum(proc.cpu_times()[:2])
            for child in proc.children(recursive=True):
                try:
                    total += sum(child.cpu_times()[:2])
                except psutil.NoSuchProcess:
                    pass
            return total
        except psutil.NoSuchProcess:
            return float("nan")

    return read


def _settle(server_cpu: Callable[[], float] | None, timeout: float = 20.0) -> None:
    """Wait (at most ``timeout`` s) until the server uses under 5% of a core: a finished job's
    last work should not run into the next training run's timing."""
    if server_cpu is None:
        return
    deadline = time.monotonic() + timeout
    before = server_cpu()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = server_cpu()
        if now - before < 0.025:
            return
        before = now


def _records_forever(stream) -> Iterator:
    """The stream's records, epoch after epoch (the same order each epoch with shuffle=False)."""
    while True:
        empty = True
        for record in stream:
            empty = False
            yield record
        if empty:
            raise RuntimeError(f"dataset {stream.dataset!r} streamed no records")


class _checked_batches:
    """Collated batches of ``stream`` (epoch after epoch), refusing any whose input_ids are not
    the fixed batches' of (a): every run must train on the same sequences in the same order."""

    def __init__(
        self, stream: TeacherStream, train_ids: torch.Tensor, batch_size: int, key: str
    ) -> None:
        self.records = _records_forever(stream)
        self.train_ids, self.batch_size, self.key = train_ids, batch_size, key

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        records = [next(self.records) for _ in range(self.batch_size)]
        batch = collate_records(records, pad_token_id=0, pin_memory=False)
        rows = batch_rows(step, self.batch_size, len(self.train_ids))
        if not torch.equal(batch["input_ids"], self.train_ids[rows]):
            raise RuntimeError(
                f"({self.key}) saw other sequences than (a) at step {step}: the comparison would "
                "not be fair"
            )
        return batch["input_ids"], batch["attention_mask"], batch["labels"], {"batch": batch}


# ---- the benchmark ------------------------------------------------------------------------------------


def _offline_cache(
    tmp: Path, teacher_path: str, train_ids: torch.Tensor, mode: str, args: argparse.Namespace
) -> tuple[Path, str, float, int]:
    """Precompute the training sequences in ``mode`` into a local store (own engine)."""
    from logitcache.server.engine.protocol import EngineOptions
    from logitcache.server.precompute import PrecomputeRequest, run_precompute

    data = tmp / "train.jsonl"
    if not data.exists():
        with open(data, "w") as f:
            for row in train_ids.tolist():
                f.write(json.dumps({"input_ids": row}) + "\n")
    dataset = f"distill-{mode.replace('_', '-')}"
    req = PrecomputeRequest(
        teacher=teacher_path,
        data=data,
        out=str(tmp / "offline-store"),
        dataset=dataset,
        top_k=args.samples if mode == "sampled" else args.top_k,
        mode=mode,
        top_p=args.top_p if mode == "top_p" else None,
        engine=EngineOptions(max_top_k=args.top_k),
        progress=False,
    )
    r = run_precompute(req)
    return tmp / "offline-store", dataset, r.seconds, r.computed_positions


def run_distill_benchmark(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from logitcache.client import Client
    from logitcache.server.engine.reference import TransformersReference
    from logitcache.server.launcher import ServerProcess

    for name in ("steps", "batch_size", "seq_len", "eval_sequences", "threads", "top_k"):
        if getattr(args, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.alpha <= 1.0:
        raise InvalidArgument(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.train_sequences is not None and args.train_sequences < 1:
        raise InvalidArgument("--train-sequences must be at least 1")
    if not 0.0 < args.temperature < math.inf:
        raise InvalidArgument(f"--temperature must be positive, got {args.temperature}")
    temperature = args.temperature
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    teacher_path = args.teacher or str(demo_teacher_path())
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = TransformersReference(teacher_path).model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    vocab = teacher.config.vocab_size
    bsz, seq_len, steps = args.batch_size, args.seq_len, args.steps
    n_train = args.train_sequences or steps * bsz
    if args.data:
        train_ids, held_out = data_token_sequences(
            teacher_path, args.data, n_train, args.eval_sequences, seq_len
        )
    else:
        train_ids = token_sequences(tokenizer, n_train, seq_len, args.train_seed)
        held_out = token_sequences(tokenizer, args.eval_sequences, seq_len, args.eval_seed)
    distinct = int(torch.unique(train_ids, dim=0).shape[0])  # --data repeats its blocks
    epochs = steps * bsz / distinct

    student_vocab = args.student_vocab or vocab
    if student_vocab < vocab:
        raise InvalidArgument(f"--student-vocab must be at least the teacher's {vocab}")
    config = student_config(student_vocab, seq_len, args.student_hidden, args.student_layers)
    torch.manual_seed(args.seed)
    initial = LlamaForCausalLM(config)
    initial.eval()
    init_state = copy.deepcopy(initial.state_dict())
    n_params = sum(p.numel() for p in initial.parameters())

    def new_student() -> torch.nn.Module:
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
        model.load_state_dict(copy.deepcopy(init_state))
        return model

    print(
        f"teacher {teacher_path}: vocab {vocab}, "
        f"{sum(p.numel() for p in teacher.parameters()):,} parameters"
    )
    print(
        f"student: Llama hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads x {config.head_dim}, output layer {student_vocab} "
        f"tokens{' (padded beyond the teacher)' if student_vocab > vocab else ''}, "
        f"{n_params:,} parameters, init seed {args.seed}"
    )
    if args.data:
        source = (
            f"{distinct} distinct training blocks x {seq_len} tokens of {args.data}, "
            f"{args.eval_sequences} held-out (its last blocks)"
        )
    else:
        source = (
            f"{n_train} training sequences x {seq_len} tokens (documents seed "
            f"{args.train_seed}), {args.eval_sequences} held-out (seed {args.eval_seed})"
        )
    print(
        f"data: {source}; {steps} steps x {bsz} sequences = {epochs:.2f} epochs; "
        f"AdamW lr {args.lr}, {args.threads} torch thread(s)"
    )
    print(
        f"distillation: (b) dense {args.loss} over {vocab} tokens, (c) top-{args.top_k} "
        f"{args.loss} with tail bucket; alpha (CE share) {args.alpha}"
    )

    def fixed_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        ids = train_ids[batch_rows(step, bsz, n_train)]
        return ids, torch.ones_like(ids), next_token_labels(ids), {}

    def ce_loss(logits: torch.Tensor, labels: torch.Tensor, extra: dict) -> torch.Tensor:
        return cross_entropy(logits, labels)

    def fused_ce_loss(h, w, b, labels: torch.Tensor, extra: dict) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return losses.fused_cross_entropy(h, w, labels, lm_head_bias=b)

    @torch.no_grad()
    def online_teacher(ids: torch.Tensor, extra: dict) -> None:
        log_p = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        extra["log_p"] = pad_vocabulary(log_p, student_vocab)

    def dense_loss(logits: torch.Tensor, labels: torch.Tensor, extra: dict) -> torch.Tensor:
        log_q = torch.log_softmax(logits.float(), -1)
        kd = dense_divergence(extra["log_p"], log_q, args.loss).mean()  # every position counts
        if args.alpha == 0.0:
            return kd
        return (1.0 - args.alpha) * kd + args.alpha * cross_entropy(logits, labels)

    def cached_loss(logits: torch.Tensor, labels: torch.Tensor, extra: dict) -> torch.Tensor:
        targets = TeacherTargets.from_batch(extra["batch"])
        return losses.distillation_loss(logits, targets, kind=args.loss, alpha=args.alpha)

    def fused_cached_loss(h, w, b, labels: torch.Tensor, extra: dict) -> torch.Tensor:  # type: ignore[no-untyped-def]
        targets = TeacherTargets.from_batch(extra["batch"])
        return losses.fused_distillation_loss(
            h, w, targets, lm_head_bias=b, kind=args.loss, alpha=args.alpha
        )

    def tempered_loss(approximate: bool) -> LogitsLoss:
        """(t)/(u): the tempered loss at ``temperature`` on the batch's top-k rows, exact with
        the batch's tails at it, or (``approximate``) renormalised with none."""

        def loss(logits: torch.Tensor, labels: torch.Tensor, extra: dict) -> torch.Tensor:
            kd = tempered_batch_loss(logits, extra["batch"], temperature, kind=args.loss,
                                     approximate=approximate)  # fmt: skip
            if args.alpha == 0.0:
                return kd
            return (1.0 - args.alpha) * kd + args.alpha * cross_entropy(logits, labels)

        return loss

    results: dict[str, RunResult] = {}
    with tempfile.TemporaryDirectory(prefix="logitcache-bench-distill-") as tmp:
        print("\nstarting logitcache serve on the teacher ...", flush=True)
        t = time.perf_counter()
        with ServerProcess(
            teacher_path, Path(tmp) / "store", "--max-top-k", str(args.top_k),
            "--default-top-k", str(args.top_k), log_path=Path(tmp) / "serve.log",
        ) as server:  # fmt: skip
            print(f"server up on {server.target} in {time.perf_counter() - t:.1f} s", flush=True)
            server_cpu = _server_cpu_reader(server.pid)
            dataset, tempered_dataset = "distill-train", "distill-train-tempered"
            # The job declares its use (the licence policy decides on it; Apache-2.0 allows it).
            # Its inputs are the benchmark's own texts: the sensitive-data filter only counts its
            # findings (the real-text teacher's docstrings hold e-mail addresses).
            bench_use = Use("research", "distill-bench-student", "llama", "logitcache bench")
            with Client(server.target, timeout=600.0, use=bench_use) as client:
                t = time.perf_counter()
                job = client.precompute(
                    dataset=dataset, input_ids=[row.numpy() for row in train_ids],
                    top_k=args.top_k, sensitive_data="allow",
                )  # fmt: skip
                final = client.wait(job, progress=False)
                capture_s = time.perf_counter() - t
                capture_positions = int(final.positions_done)
                print(
                    f"(c) job {final.id}: {final.sequences_done} sequences, "
                    f"{capture_positions:,} positions captured at k={args.top_k} in "
                    f"{capture_s:.1f} s ({capture_positions / capture_s:,.0f} positions/s, "
                    "submit to completion)",
                    flush=True,
                )
                if "t" in args.modes:
                    t = time.perf_counter()
                    job = client.precompute(
                        dataset=tempered_dataset, input_ids=[row.numpy() for row in train_ids],
                        top_k=args.top_k, temperatures=[temperature], sensitive_data="allow",
                    )  # fmt: skip
                    final = client.wait(job, progress=False)
                    print(
                        f"(t) job {final.id}: {int(final.positions_done):,} positions captured "
                        f"at k={args.top_k} with the tails at T={temperature:g} in "
                        f"{time.perf_counter() - t:.1f} s",
                        flush=True,
                    )

            print("\n(a) cross-entropy on the text (logits)", flush=True)
            results["a"] = train(
                "(a)", new_student, fixed_batch, on_logits(ce_loss), None, args, server_cpu
            )
            print("(a') cross-entropy on the text, fused", flush=True)
            results["a'"] = train(
                "(a')", new_student, fixed_batch, fused(fused_ce_loss), None, args, server_cpu
            )
            print(f"(b) online distillation, dense teacher ({args.loss})", flush=True)
            results["b"] = train(
                "(b)", new_student, fixed_batch, on_logits(dense_loss), online_teacher, args,
                server_cpu,
            )  # fmt: skip

            def cached_run(key: str, name: str, title: str, step_loss: StepLoss) -> None:
                """Train run ``key`` on dataset ``name`` streamed from the server, checking that
                every batch holds (a)'s token ids."""
                print(f"({key}) top-{args.top_k} {title} (gRPC stream)", flush=True)
                stream = TeacherStream(f"grpc://{server.target}", name, seed=args.seed,
                                       shuffle=False)  # fmt: skip
                if len(stream) != n_train or stream.space.k != args.top_k:
                    raise RuntimeError(
                        f"dataset {name!r} streams {len(stream)} records at k={stream.space.k}; "
                        f"expected {n_train} at k={args.top_k}"
                    )
                if stream.space.vocab_size != vocab:
                    raise RuntimeError(
                        f"cache vocabulary {stream.space.vocab_size} != teacher's {vocab}"
                    )
                results[key] = train(
                    f"({key})", new_student, _checked_batches(stream, train_ids, bsz, key),
                    step_loss, None, args, server_cpu,
                )  # fmt: skip
                print(f"  ({key}) every batch's input_ids equal (a)'s ({steps} batches checked)")

            print(f"(c) distillation from the cache over gRPC (top-{args.top_k})", flush=True)
            cached_run("c", dataset, "loss fused", fused(fused_cached_loss))
            if "l" in args.modes:
                cached_run("l", dataset, "loss on the logits", on_logits(cached_loss))
            if "t" in args.modes:
                at = f"{args.loss} at T={temperature:g}"
                cached_run("t", tempered_dataset, f"{at} with the stored tails, on the logits",
                           on_logits(tempered_loss(False)))  # fmt: skip
                cached_run("u", dataset, f"{at} without tails (top-k renormalised, tail "
                           "dropped), on the logits", on_logits(tempered_loss(True)))  # fmt: skip

        for key, mode in (("d", "top_p"), ("e", "sampled")):
            if key not in args.modes:
                continue
            store, dataset, seconds, positions = _offline_cache(
                Path(tmp), teacher_path, train_ids, mode, args
            )
            print(
                f"\n({key}) {mode} cache precomputed offline: {positions:,} positions in "
                f"{seconds:.1f} s ({positions / seconds:,.0f} positions/s)",
                flush=True,
            )
            stream = TeacherStream(str(store), dataset, seed=args.seed, shuffle=False)
            print(f"({key}) distillation from the {mode} cache, fused (store stream)", flush=True)
            results[key] = train(
                f"({key})", new_student, _checked_batches(stream, train_ids, bsz, key),
                fused(fused_cached_loss), None, args, None,
            )  # fmt: skip

    print(f"\ntiming one step of each run, interleaved, {TIMING_ROUNDS} rounds ...", flush=True)
    measure_steps(results, new_student, args.lr)
    print("evaluating on held-out text (teacher: transformers reference forward pass) ...")
    t = time.perf_counter()
    reference = teacher_logprobs(teacher, held_out)
    rows: list[tuple[str, HeldOut, RunResult | None]] = [
        ("teacher (reference)", evaluate(teacher, held_out, reference, temperature), None),
        ("student, untrained", evaluate(initial, held_out, reference, temperature), None),
    ]
    labels = {
        "a": "(a) cross-entropy on text",
        "a'": "(a') cross-entropy, fused",
        "b": f"(b) online KD, dense {args.loss}",
        "c": f"(c) KD from cache, top-{args.top_k}, fused",
        "l": f"(l) KD from cache, top-{args.top_k}, logits",
        "d": f"(d) KD, adaptive top-p {args.top_p:g}, fused",
        "e": f"(e) KD, sampled U={args.samples}, fused",
        "t": f"(t) KD T={temperature:g}, top-{args.top_k} + tails",
        "u": f"(u) KD T={temperature:g}, top-{args.top_k}, no tails",
    }
    scores: dict[str, HeldOut] = {}
    for key, r in results.items():
        scores[key] = evaluate(r.model, held_out, reference, temperature)
        rows.append((labels[key], scores[key], r))
    eval_s = time.perf_counter() - t
    torch.set_num_threads(previous_threads)

    held_positions = held_out.numel()
    print(
        f"\nheld-out: {args.eval_sequences} sequences x {seq_len} tokens = {held_positions:,} "
        f"positions; KL in nats per position over the full vocabulary; evaluated in {eval_s:.1f} s"
    )
    print_results(rows, results["a'"], results["a"], bsz * seq_len, temperature)
    for key in "cde":
        if key in scores:
            print(f"({key})/(b) KL ratio: {scores[key].kl / scores['b'].kl:.3f}")
    print(f"(a) KL / (c) KL:  {scores['a'].kl / scores['c'].kl:.2f}")
    if "t" in scores:
        exact, renormalised = scores["t"], scores["u"]
        print(
            f"at T={temperature:g}: held-out KL@T (t) with tails {exact.kl_tempered:.4f}, (u) "
            f"without {renormalised.kl_tempered:.4f}, (u)/(t) "
            f"{renormalised.kl_tempered / exact.kl_tempered:.3f}; at T=1 (t) {exact.kl:.4f}, "
            f"(u) {renormalised.kl:.4f}"
        )

    c = results["c"]
    print(
        f"\n(c) input side: {c.positions:,} positions taken from the stream in {c.data_s:.2f} s "
        f"of waiting (next() + collate, first batch {c.first_batch_s:.2f} s of it) = "
        f"{c.positions / max(c.data_s, 1e-9):,.0f} positions/s consumed; "
        f"{c.data_s / c.wall_s:.1%} of (c)'s wall time"
    )
    print("\nwhere each run's time went (s):")
    head = (
        f"{'run':5s} {'data':>7s} {'teacher':>8s} {'fwd+loss':>9s} {'bwd+step':>9s} {'wall':>7s} "
        f"{'server CPU':>11s}"
    )
    print(head)
    for key, r in results.items():
        server = f"{r.server_cpu_s / r.wall_s:>10.0%}" if r.server_cpu_s is not None else "n/a"
        print(
            f"{'(' + key + ')':5s} {r.data_s:>7.2f} {r.teacher_s:>8.2f} {r.forward_s:>9.2f} "
            f"{r.update_s:>9.2f} {r.wall_s:>7.2f} {server:>11s}"
        )
    print(
        "(fwd+loss: the fused losses run inside the student's forward and take their gradient "
        "there; server CPU: share of one core, server and engine processes together)"
    )
    print(
        f"(c) capture job: {capture_positions:,} positions in {capture_s:.1f} s "
        f"({capture_positions / capture_s:,.0f} positions/s)"
    )
    print(f"total benchmark time: {time.perf_counter() - started:.1f} s")
