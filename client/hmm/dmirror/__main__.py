import sys

from hmm.dmirror.cli import main

sys.exit(main())
