"""The sharded, resumable record loop that the harness and certification share.

Work is cut into items, each seeded from its own key alone, so that an item gives the same record on any process
and after any interruption. Items are dealt round-robin to the `accelerate` processes, gathered on the main one
and appended to a JSONL file; a killed run resumes from the records already there. A folder's records are reused
only for the very settings they were made with (the examples, every model's digest, the budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from core.errors import InputError
from core.io import append_jsonl, read_jsonl, undigested
from core.runs import same_or_fail


def gather_all(acc, rec) -> list:
    """Every process's record on every process (one process: just this one)."""
    if acc.num_processes == 1:
        return [rec]
    from accelerate.utils import gather_object

    return gather_object([rec])


def open_records(folder: Path, settings: dict, what: str, acc, models=(), name: str = "examples.jsonl") -> dict:
    """FOLDER/NAME's records by key (a torn last line, from a kill mid-write, ignored) when FOLDER/settings.json
    holds `settings`; {} for a new folder (the settings written); a FileExistsError naming what changed
    otherwise. Records of a model the digest cannot tell apart from another (`core.io.undigested`) are refused."""
    same_or_fail(folder / "settings.json", settings, what, write=acc.is_main_process)
    acc.wait_for_everyone()
    records = read_jsonl(folder / name)
    hidden = [a for m in models for a in undigested(m)]
    if records and hidden:
        raise InputError(f"{folder} holds {what}, but the model's attribute(s) {', '.join(hidden)} are objects its "
                         "digest cannot read, so another setting of them would look the same: delete the folder "
                         "to start afresh (a `config()` or `extra_repr` on that module lets records be reused)")
    return records


def run_records(items: list, work: Callable, log: Path | None, acc, key: Callable, records: dict,
                desc: str | None = None, total: int | None = None) -> dict:
    """`work(item) -> record` for every item, dealt round-robin to the processes; each round's records appended
    to `log` by the main process and filed into `records` under `key(record)` on every process."""
    world, rank = acc.num_processes, acc.process_index
    done = 0 if total is None else total - len(items)
    bar = tqdm(total=total or len(items), initial=done, desc=desc, disable=desc is None or not acc.is_main_process)
    if acc.is_main_process and log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(items), world):
        mine = items[start + rank] if start + rank < len(items) else None
        got = [r for r in gather_all(acc, work(mine) if mine is not None else None) if r is not None]
        if acc.is_main_process and log is not None:
            append_jsonl(log, got)
        for r in got:
            records[key(r)] = r
        bar.update(len(got))
    bar.close()
    return records
