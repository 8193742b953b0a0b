#!/usr/bin/env bash
# Execute the notebooks on a GPU machine and save their outputs in place, so the committed
# notebooks/*.ipynb carry GPU outputs (live checks and live benchmark rows).
#
#   scripts/execute_notebooks_on_gpu.sh                      # every notebook
#   scripts/execute_notebooks_on_gpu.sh 04_marlin_layout ... # some of them (names or paths)
#
# Run from anywhere; it works in the repository root. The GPU image has numpy, matplotlib,
# torch, CuPy and Numba but no Jupyter, so the wheels in .whl/ (nbclient, ipykernel and
# their dependencies, for CPython 3.12 x86_64; the folder is git-ignored, so carry it) are
# installed into /tmp/site without touching the image's packages, and a python3 kernelspec
# is installed under /tmp/jk. Each notebook is written back as soon as it has run, so a
# run cut short keeps what it finished; a failing cell stops that notebook and the script
# exits non-zero after trying the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if ! python3 -c "import nbclient, ipykernel" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in $REPO/.whl: carry the .whl folder to this machine" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m ipykernel install --prefix /tmp/jk --name python3 >/dev/null 2>&1
export JUPYTER_PATH=/tmp/jk/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}
# The kernel imports this checkout's `reference` and `steps` whether or not it is installed.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export MPLBACKEND=module://matplotlib_inline.backend_inline

python3 - "$@" <<'EOF'
import sys
import time
from pathlib import Path

import nbclient
import nbformat

notebooks = Path("notebooks")
names = sys.argv[1:] or sorted(p.stem for p in notebooks.glob("*.ipynb"))
failed = []
for name in names:
    path = notebooks / f"{Path(name).stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(notebooks)}}
    )
    try:
        client.execute()
        status = "ok"
    except nbclient.exceptions.CellExecutionError as e:
        failed.append(path.name)
        status = f"FAILED\n{str(e)[-2000:]}"
    nbformat.write(nb, path)
    print(f"{path.name}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
sys.exit(1 if failed else 0)
EOF
