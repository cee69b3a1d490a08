import sys

from transfertune.cli.main import main

sys.exit(main())
