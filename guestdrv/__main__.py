import sys

from guestdrv.cli import main

sys.exit(main())
