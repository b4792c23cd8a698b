import sys

from pcompile.cli import main

sys.exit(main())
