from nvalchemi_jax.cli import main

main()
