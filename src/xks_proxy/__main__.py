import sys

from xks_proxy.cli import main

sys.exit(main())
