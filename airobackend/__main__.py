import sys

from airobackend.cli import main

sys.exit(main())
