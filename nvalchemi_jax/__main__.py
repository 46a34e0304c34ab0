from nvalchemi_jax.cli import main

raise SystemExit(main())
