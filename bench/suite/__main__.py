import sys

from bench.suite.run import main

sys.exit(main())
