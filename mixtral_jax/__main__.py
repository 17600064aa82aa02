from mixtral_jax.cli import entry

entry()
