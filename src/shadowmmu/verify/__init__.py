"""``shadowmmu.verify``: how the model is checked, kept apart from what it models.

- ``qemu_oracle``: one memory access run through QEMU's x86 MMU (unicorn);
- ``differential``: random paging cases, our walker against that oracle
  (``selfcheck --cases``);
- ``lockstep``: one random guest program on a native VM and on a shadow VM,
  compared step by step (``selfcheck --lockstep``);
- ``campaigns``: a lockstep campaign cut into seeded chunks on local or dask
  workers, with a resumable state file;
- ``reach``: the MMU branch coverage a fixed lockstep campaign reaches
  (``python -m shadowmmu.verify.reach``, ``make reach``);
- ``choosers``: where both generators' random decisions come from (a seeded
  ``random.Random`` for campaigns, hypothesis for tests).

Nothing is imported here: unicorn and hypothesis load only with the module that
needs them, so ``x86``, ``mmu``, ``vm`` and the CLI stay free of them."""
