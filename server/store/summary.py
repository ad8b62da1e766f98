"""What ``logitcache inspect`` prints: spaces, datasets, sizes and provenance of a store."""

from __future__ import annotations

import json
import time

from logitcache.server.store.store import Store


def store_summary(store: Store, dataset: str | None = None) -> dict:
    """A JSON-able description of a store (or of one dataset in it)."""
    spaces = []
    for space in store.spaces():
        totals = store.totals(space.space_id)
        positions, nbytes = totals.positions, totals.stored_bytes
        spaces.append(
            {
                **space.to_json(),
                "segments": totals.segments,
                "records": totals.records,
                "positions": positions,
                "bytes": nbytes,
                "bytes_per_position": nbytes / positions if positions else None,
            }
        )
    per_position = {s["space_id"]: s["bytes_per_position"] for s in spaces}
    names = [dataset] if dataset is not None else store.datasets()
    datasets = []
    for name in names:
        ds = store.dataset(name)
        bpp = per_position.get(ds.space.space_id)
        datasets.append(
            {
                "name": name,
                "state": ds.manifest["state"],
                "space_id": ds.space.space_id,
                "space": ds.space.to_json(),
                "sequences": len(ds),
                "unique_sequences": len(set(ds.keys)),
                "sealed_sequences": ds.sealed_count(),
                "positions": ds.positions,
                "estimated_bytes": round(bpp * ds.positions) if bpp else None,
                "created_at": ds.manifest["created_at"],
                "completed_at": ds.manifest["completed_at"],
                "provenance": ds.provenance,
            }
        )
    return {"store": store.url, "spaces": spaces, "datasets": datasets}


def format_summary(summary: dict) -> str:
    """Human-readable form of :func:`store_summary`."""
    lines = [f"store {summary['store']}"]
    lines.append(f"capture spaces: {len(summary['spaces'])}")
    for s in summary["spaces"]:
        bpp = s["bytes_per_position"]
        lines += [
            f"  {s['space_id']}  mode={s['mode']} k={s['k']} vocab={s['vocab_size']} "
            f"dtype={s['engine_dtype']} codec={s['codec']}",
            f"    teacher {s['teacher_fingerprint'][:16]}  tokenizer {s['tokenizer_fingerprint'][:16]}",
            f"    {s['segments']} segments, {s['records']:,} records, {s['positions']:,} positions, "
            f"{_size(s['bytes'])} on disk"
            + (f", {bpp:.1f} bytes/position (naive int32+fp32: {8 * s['k']})" if bpp else ""),
        ]
    lines.append(f"datasets: {len(summary['datasets'])}")
    for d in summary["datasets"]:
        p = d["provenance"]
        lines += [
            f"  {d['name']}  [{d['state']}]  space {d['space_id']}",
            f"    {d['sequences']:,} sequences ({d['unique_sequences']:,} unique, "
            f"{d['sealed_sequences']:,} sealed), {d['positions']:,} positions"
            + (f", ~{_size(d['estimated_bytes'])}" if d["estimated_bytes"] else ""),
            f"    teacher {p['teacher']} ({p['teacher_architecture']}), license: "
            f"{p['license'] or 'not declared'}, requester: {p['requester']}",
            f"    source {p['source']['path']} (sha256 {p['source']['sha256'][:16]}), "
            f"created {_when(d['created_at'])}"
            + (f", completed {_when(d['completed_at'])}" if d["completed_at"] else ""),
        ]
        skipped = p["source"].get("skipped_rows") or {}
        if skipped or p["source"].get("truncated_rows") or p["source"].get("split_rows"):
            lines.append(
                f"    input: skipped {json.dumps(skipped)}, truncated {p['source']['truncated_rows']}, "
                f"split {p['source']['split_rows']}"
            )
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
