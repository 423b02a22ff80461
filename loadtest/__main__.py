"""`python -m loadtest ...` is `kvsplice-loadtest ...`."""
import sys

from loadtest.cli import main

sys.exit(main())
