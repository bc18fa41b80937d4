import sys

from gendist.cli import main

sys.exit(main())
