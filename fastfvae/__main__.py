import sys

from fastfvae.cli import main

sys.exit(main())
