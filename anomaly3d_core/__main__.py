import sys

from anomaly3d_core.cli import main

sys.exit(main())
