"""``fastkd cache verify DIR [--data DATA]``: re-check a teacher cache byte for byte.

Every finished epoch file is re-hashed and compared with the SHA-256 its build recorded. With
``--data`` (the data set the cache was built from) every training image is re-hashed too and
compared with the SHA-256 recorded at build: a changed image means its cached logits are stale.
An image whose contents are unchanged but whose size/modification time record differs (a copy
that did not keep times) gets its record updated, so training from the cache accepts it again.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from . import store

logger = logging.getLogger("fastkd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", metavar="DIR", help="the cache folder (built by 'fastkd cache build')")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="the data set the cache was built from: also re-hash every training image")


def verify_cache(root, data=None) -> dict:
    """Check ``root``; returns ``{"problems": [...], "epochs_checked", "files_checked", "times_updated"}``."""
    root = Path(root)
    manifest = store.read_manifest(root)
    problems: list[str] = []
    sums = manifest.get("epoch_sha256", {})
    checked = 0
    unrecorded = []
    for epoch in sorted(int(e) for e in manifest["epochs_done"]):
        path = root / store.epoch_name(epoch)
        want = sums.get(str(epoch))
        if want is None:
            unrecorded.append(epoch)
            continue
        if not path.is_file():
            problems.append(f"{path.name} is missing")
        elif store.epoch_sha256(path) != want:
            problems.append(f"{path.name} fails its checksum (changed after the build)")
        checked += 1
    if unrecorded:
        logger.warning("fastkd cache verify: epochs %s have no recorded checksum (built by an older fastkd)",
                       store._ranges(unrecorded))
    out = {"problems": problems, "epochs_checked": checked, "files_checked": 0, "times_updated": 0}
    if data is None:
        return out
    from ..data import build_index

    index = build_index(data, train=True)
    if store.index_sha256(index) != manifest["data"].get("index_sha256"):
        problems.append(f"--data {data} is not the file list the cache was built from (paths or labels differ)")
        return out
    records = store.read_data_files(root, manifest)
    if records is None:
        problems.append("the cache records no data file checksums (built by an older fastkd): rebuild it to verify "
                        "the images")
        return out
    now = store.data_file_records(index)
    out["files_checked"] = len(now)
    differ = np.flatnonzero((now["sha256"] != records["sha256"]).any(axis=1)).tolist()
    if differ:
        problems.append(f"the data file {index.paths[differ[0]]} changed after the build"
                        + (f" ({len(differ) - 1} more file(s) too)" if len(differ) > 1 else "")
                        + ": its cached teacher logits are stale; rebuild the cache")
        return out
    stale_times = np.flatnonzero((now["size"] != records["size"]) | (now["mtime_ns"] != records["mtime_ns"]))
    if len(stale_times) and not problems:
        from ..engine.runlock import lock_output

        lock = lock_output(root, "cache")  # no build may run while the records change
        try:
            manifest = store.read_manifest(root)
            manifest["data_files_sha256"] = store.write_data_files(root, now)
            store.write_json_atomic(root / store.MANIFEST, manifest)
        finally:
            lock.release()
        out["times_updated"] = len(stale_times)
        logger.info("fastkd cache verify: %d data file(s) have new modification times but the same contents: their "
                    "records are updated", len(stale_times))
    return out


def main(args: argparse.Namespace) -> int:
    result = verify_cache(args.cache, args.data)
    problems = result["problems"]
    if problems:
        raise ValueError(f"{args.cache}: {len(problems)} problem(s): " + "; ".join(problems))
    what = f"{result['epochs_checked']} epoch file(s)"
    if args.data is not None:
        what += f" and {result['files_checked']} data file(s)"
    logger.info("fastkd cache verify: %s: %s match their checksums", args.cache, what)
    return 0
