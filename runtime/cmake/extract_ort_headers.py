"""Extract the onnxruntime C/C++ API headers from a downloaded amd-quark wheel.

Usage: extract_ort_headers.py WHEEL DEST. Only files ending in .h under the
onnxruntime-1.17.0 include folder are written; DEST receives the folder's
contents (DEST/onnxruntime/core/session/onnxruntime_c_api.h, ...).
"""

import pathlib
import sys
import zipfile

PREFIX = "quark/onnx/operators/custom_ops/include/onnxruntime-1.17.0/"


def main() -> int:
    wheel, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.startswith(PREFIX) or not name.endswith(".h"):
                continue
            relative = pathlib.PurePosixPath(name[len(PREFIX):])
            if relative.is_absolute() or ".." in relative.parts:
                continue
            target = dest.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
            count += 1
    if count == 0:
        print(f"no headers under {PREFIX} in {wheel}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
