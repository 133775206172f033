"""`python -m medsapiens.worker`: serve requests on stdin, reply on stdout (see protocol.py)."""
import sys

from .server import main

sys.exit(main())
