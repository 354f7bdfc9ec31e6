#!/usr/bin/env python3
"""Rehearse ``scripts/gpu-check.sh --carried`` here: a Python that has only what the device
machine has (docs/gpu-check.md).

Makes a venv at ``DEST`` whose site-packages reach, through one ``.pth`` file, links to the
distributions of this project's venv that ``scripts/gpu-check-device-packages.txt`` lists
(torch among them) and nothing else, so that the carried wheels must supply the rest, as
on the device. Prints the venv's python. Run with the project's venv:

    .venv/bin/python scripts/gpu_check_emulate_device.py /tmp/device-python
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str]) -> int:
    dest = Path(argv[0]).resolve()
    text = (ROOT / "scripts" / "gpu-check-device-packages.txt").read_text()
    has = {norm(w) for w in text.split() if not w.startswith("#")}
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(dest)], check=True)
    links = dest / "device-site"
    links.mkdir()
    for dist in md.distributions():
        if norm(dist.metadata["Name"]) not in has or not dist.files:
            continue
        site_dir = Path(str(dist.locate_file(""))).resolve()
        tops = {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith("..")}
        for top in tops:
            src = site_dir / top
            if src.exists() and not (links / top).exists():
                (links / top).symlink_to(src)
    site = subprocess.run(
        [str(dest / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "device_site.pth").write_text(f"{links}\n")
    print(dest / "bin" / "python")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
