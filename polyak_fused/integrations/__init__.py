"""Thin integrations with training frameworks, one module per framework, each imported only when
used (``polyak_fused`` itself never imports a framework):

* ``polyak_fused.integrations.hf``: Hugging Face ``Trainer`` (``attach(trainer)``);
* ``polyak_fused.integrations.lightning``: Lightning (``PolyakCallback``).

Each one watches the loss that is backpropagated (``opt.watch_loss``), so that the step's loss is
the function whose gradient is in ``.grad`` under gradient accumulation and mixed precision; fills
``InexactPolyak``'s ``total_steps`` from the trainer's plan when it was left ``None``; and refuses
the trainer settings that silently change the method (gradient clipping before the step; for the
parameter-free methods, a schedule that decays ``lr``, their step multiplier), unless the user
opts in. ``accelerate`` needs no module: call ``opt.watch_loss(loss)`` on the optimizer you created
before ``accelerator.backward(loss)`` (see the README).

Install the frameworks with ``pip install "polyak-fused[integrations]"``.
"""
