"""Distill a student from a logitcache dataset with a plain PyTorch loop.

The recipe reads top to bottom: ``main`` joins torch.distributed if torchrun started us, and
``train`` opens this rank's share of the cached teacher distributions, builds the student, checks
that the cache can teach it, and loops: batch -> student -> distillation loss -> step. The loss
is computed inside the student's output layer from its hidden states (``fused``), so its
[B, T, V] logits never exist; a student without a plain output layer gets the loss on logits.

    # one process, from a logitcache server or straight from a store on a shared file system
    python examples/distill_loop.py --source grpc://localhost:50051 --dataset demo --steps 200
    python examples/distill_loop.py --source /data/logitcache --dataset demo --steps 200

    # data parallel: each rank streams its own partition of every epoch (gloo on CPU, nccl on GPU)
    torchrun --nproc-per-node 2 examples/distill_loop.py --source /data/logitcache --dataset demo

    # sharded (FSDP2), saving at the end and resuming from there on the next run
    torchrun --nproc-per-node 2 examples/distill_loop.py ... --fsdp --checkpoint ckpt/

Every rank runs the same number of batches per epoch (the stream evens the ranks' shares out,
``TeacherStream(uneven=...)``), so the collectives of DDP and FSDP always pair up.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from logitcache import Record
from logitcache.trainer.collate import Collator, TeacherTargets
from logitcache.trainer.guards import check_student
from logitcache.trainer.losses import distillation_loss, fused_distillation_loss
from logitcache.trainer.output_layer import loss_in_output_layer, output_layer
from logitcache.trainer.stream import TeacherStream


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Distill a student from a logitcache dataset.")
    p.add_argument(
        "--source",
        required=True,
        help="grpc://host:port of a logitcache server, or a store path / URL",
    )
    p.add_argument("--dataset", required=True, help="name of the precomputed dataset")
    p.add_argument(
        "--student-config",
        help="Hugging Face config (directory or config.json) of the student, trained "
        "from scratch; default: a small Llama with the teacher's vocabulary",
    )
    p.add_argument("--hidden-size", type=int, default=64, help="of the default student")
    p.add_argument("--layers", type=int, default=2, help="of the default student")
    p.add_argument(
        "--tokenizer", help="the student's tokenizer directory: refused unless it is the teacher's"
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (on every rank)")
    p.add_argument("--batch-size", type=int, default=8, help="records per rank and step")
    p.add_argument("--max-len", type=int, help="keep only the first MAX_LEN tokens of a record")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.0,
        help="weight of the hard-label cross-entropy: (1 - a) * KD + a * CE",
    )
    p.add_argument("--beta", type=float, default=0.5, help="teacher weight of --loss jsd")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="data order and student initialisation")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--fsdp", action="store_true", help="shard the student with FSDP2, not DDP")
    p.add_argument(
        "--checkpoint",
        help="directory: resume from it if it holds a checkpoint, and save one there at the end",
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--report",
        help="write this rank's run as JSON (keys read, losses, parameter checksum); "
        "'{rank}' in the path is replaced by the rank",
    )
    return p.parse_args(argv)  # fmt: skip


def setup_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group).

    torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1
    we join the group from those variables. A group the caller already created is used as is.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, created
    return 0, 1, device, created


def build_student(args: argparse.Namespace, vocab_size: int) -> torch.nn.Module:
    """A student with random weights: from --student-config, or a Llama like the demo teacher
    (4 layers, hidden 128) but smaller, over the teacher's vocabulary."""
    if args.student_config:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.student_config))
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def collate_with_keys(records: list[Record], collator: Collator) -> dict[str, Any]:
    """The collator's padded tensors, plus the keys of the records (for --report)."""
    return {**collator(records), "keys": [r.key for r in records]}


def distill_step_loss(
    model: torch.nn.Module,
    head: torch.nn.Linear | None,
    batch: dict[str, Any],
    args: argparse.Namespace,
) -> torch.Tensor:
    """(1 - alpha) * KD + alpha * CE for one batch: fused in the output layer when there is one.

    Position t of every tensor is aligned: the student's output at t, the teacher's row t (its
    distribution over token t + 1), labels[:, t] = input_ids[:, t + 1].
    """
    targets = TeacherTargets.from_batch(batch)
    options = dict(kind=args.loss, beta=args.beta, alpha=args.alpha, temperature=args.temperature)
    inputs = dict(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    if head is None:
        return distillation_loss(model(**inputs).logits, targets, **options)
    with loss_in_output_layer(
        head, lambda h, w, b: fused_distillation_loss(h, w, targets, lm_head_bias=b, **options)
    ) as scored:
        return scored.loss_from(model(**inputs))  # fmt: skip


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, int],
    rank: int,
) -> None:
    """Model and optimizer (each rank its shards), and each rank's place in the data."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    Path(path, f"progress-rank{rank}.json").write_text(json.dumps(progress))


def load_checkpoint(
    path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> dict[str, int] | None:
    """The saved progress after loading the state saved at ``path``; None if there is none."""
    progress = Path(path, f"progress-rank{rank}.json")
    if not progress.exists():
        return None
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return json.loads(progress.read_text())


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters, gathered from the ranks' shards under FSDP (a collective)."""
    state, _ = get_state_dict(model, [], options=StateDictOptions(full_state_dict=True))
    return state


def parameters_checksum(parameters: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, param in parameters.items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> float:
    """The recipe; returns the last step's loss (averaged over ranks)."""
    # --- data: this rank's partition of the dataset, in the (seed, epoch) order -------------------
    # The stream picks rank and world size up from torch.distributed; DataLoader workers
    # split the rank's share again, so no record is read twice.
    stream = TeacherStream(args.source, args.dataset, seed=args.seed)
    if len(stream) == 0:
        raise SystemExit(f"dataset {args.dataset!r} has no records for rank {rank}")
    loader = DataLoader(
        stream,
        batch_size=args.batch_size,
        collate_fn=functools.partial(collate_with_keys, collator=Collator(max_len=args.max_len)),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )

    # --- student: random weights, the same on every rank; refused if the cache can't teach it -----
    torch.manual_seed(args.seed)
    student = build_student(args, stream.space.vocab_size)
    check_student(
        stream.space,
        tokenizer_path=args.tokenizer,
        vocab_size=student.get_output_embeddings().weight.shape[0],
    )
    student.to(device).train()
    head = output_layer(student)  # the loss is fused into it; None: on the logits
    # DDP averages the gradients of all ranks in backward(), so every rank takes the same step;
    # FSDP2 shards parameters, gradients and optimizer state across the ranks instead.
    if args.fsdp:
        model = fully_shard(student)
    elif world_size > 1:
        model = DistributedDataParallel(
            student, device_ids=[device] if device.type == "cuda" else None
        )
    else:
        model = student
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # --- resume: the weights, the optimizer, and the place in the data -------------------------
    step, epoch, batches_in_epoch = 0, 0, 0
    progress = load_checkpoint(args.checkpoint, model, optimizer, rank) if args.checkpoint else None
    if progress is not None:
        step, epoch, batches_in_epoch = progress["step"], progress["epoch"], progress["batches"]
        stream.set_epoch(epoch)
        stream.load_batches_taken(batches_in_epoch, args.batch_size, args.workers)

    # --- the loop ---------------------------------------------------------------------------------
    # Every rank runs exactly --steps steps, and the same number of batches per epoch.
    losses, keys = [], []
    loss = torch.tensor(float("nan"), device=device)  # (a run resumed at its last step)
    started = time.perf_counter()
    while step < args.steps:
        if batches_in_epoch == 0:
            stream.set_epoch(epoch)  # a new order each epoch, the same on every rank
        for batch in loader:
            keys += batch.pop("keys")
            batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
            loss = distill_step_loss(model, head, batch, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()

            step += 1
            batches_in_epoch += 1
            losses.append(loss.item())
            if step % args.log_every == 0 or step == args.steps:
                mean = mean_over_ranks(loss)
                if rank == 0:
                    elapsed = time.perf_counter() - started
                    print(f"step {step:>6}  epoch {epoch}  loss {mean:.4f}  {elapsed:7.1f} s")
            if step == args.steps:
                break
        else:  # the epoch ran out
            epoch, batches_in_epoch = epoch + 1, 0

    final_loss = mean_over_ranks(loss)
    if rank == 0:
        print(f"final loss {final_loss:.4f}")
    if args.checkpoint:
        progress = {"step": step, "epoch": epoch, "batches": batches_in_epoch}
        save_checkpoint(args.checkpoint, model, optimizer, progress, rank)
    if args.report:
        parameters = full_parameters(model)
        report = {
            "rank": rank,
            "world_size": world_size,
            "keys": keys,
            "losses": losses,
            "final_loss": final_loss,
            "parameters_sha256": parameters_checksum(parameters),
            "parameter_sums": [float(t.double().sum()) for t in parameters.values()],
        }
        Path(args.report.format(rank=rank)).write_text(json.dumps(report))
    return final_loss


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    rank, world_size, device, created_group = setup_distributed()
    if args.report and world_size > 1 and "{rank}" not in args.report:
        raise SystemExit("--report needs '{rank}' in its path when several ranks run")
    try:
        return train(args, rank, world_size, device)
    finally:
        if created_group:
            # DDP sits in a reference cycle and holds the process group. Freed only after
            # destroy_process_group, it would tear gloo down while holding the GIL, which can
            # deadlock with gloo's worker threads (pytorch/pytorch#56297): collect it first.
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
