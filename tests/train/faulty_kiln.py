"""`python -m kiln` with the faults of KILN_TEST_FAULTS installed first (see faults.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faults import install_from_env  # noqa: E402

if __name__ == "__main__":
    install_from_env()
    from kiln.cli import main
    sys.exit(main())
