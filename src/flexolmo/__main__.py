import sys

from flexolmo.cli import main

sys.exit(main())
