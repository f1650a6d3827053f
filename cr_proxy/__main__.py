import sys

from cr_proxy.cli import main

sys.exit(main())
