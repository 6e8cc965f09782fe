"""The engine: what any attribution method needs from one trained model, on B >= 1 copies.

- ``functional``: the model as a pure function of its state; ``ModelState`` (theta).
- ``grads``: per-sample gradients, Gauss-Newton factors, explicit Hessians.
- ``hooks``: per-sample gradients and layer calls from module hooks, without ``vmap``.
- ``training``: minibatch optimisation with the task's recipe toward given targets, with a
  given extra objective and stop rule; ``train``, ``train_ensemble``.
- ``stacked``: B copies trained side by side under ``vmap`` (``StackedState``).
- ``projection``: seeded dense and Kronecker projections.
- ``features``: projected per-sample gradients, chunked, spilled to disk.
- ``linalg``: float64 blocks, Gram products, Cholesky, Woodbury and CG solvers.
- ``curvature``: Fisher, Gauss-Newton and Hessian, and their damping rule.
- ``ekfac``: K-FAC and EK-FAC factors of the Fisher from the layer hooks, and their solver.
- ``factored``: exact Fisher and Gauss-Newton solves from layer factors.
- ``budget``: the memory policy (hold, spill or refuse; copies that fit).
- ``engine``: ``Engine``, one model's theta*, projector and budget binding the above.

The engine knows no method: no baselines, target paths or model outputs of a method live
here. Imports: the ground floor and ``iif.task``; inside, no circles.
"""
