"""A data set written once as an image folder, reused after: the one implementation behind
:func:`fastkd.data.make_digits_imagefolder` and :func:`fastkd.data.animal.make_animal_imagefolder`.

A finished folder carries a marker file with the parameters it was made with and is reused; other
parameters, or a non-empty foreign folder, are an error; the folder is written aside (a staging
folder next to it) and renamed into place, so a killed build leaves no half folder, and two
processes building the same folder both end with the one that finished first.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cached_image_folder(root: Path, marker_name: str, params: dict, what: str,
                        write: Callable[[Path], dict]) -> Path:
    """``root`` holding the data set ``write(staging) -> counts`` wrote, made once for ``params``.

    ``what`` names the data set in errors (e.g. "a digits folder")."""
    marker = root / marker_name
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found.get("params") != params:
            raise FileExistsError(f"{str(root)!r} holds {what} made with {found.get('params')}, not {params}; "
                                  "choose another root")
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{str(root)!r} exists and is not an empty folder nor fastkd's {what}")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        counts = write(staging)
        (staging / marker_name).write_text(json.dumps({"params": params, "counts": counts}, indent=1))
        if root.exists():  # an empty folder: os.replace needs it gone
            root.rmdir()
        try:
            os.replace(staging, root)
        except OSError:
            if not marker.is_file():  # not another process finishing the same folder first
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return cached_image_folder(root, marker_name, params, what, write)  # checks its parameters
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
