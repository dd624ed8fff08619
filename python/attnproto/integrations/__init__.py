"""attnproto's kernels inside frameworks, without a fork of the framework:

* :mod:`.torch_ops` — torch custom ops (``torch.ops.attnproto.*``) with fake (meta)
  implementations, exact ``mutates_args``, launched on torch's current CUDA stream (a CPU
  implementation through attnproto's numpy backend, so the ops are checked on any machine);
* :mod:`.transformers` — ``register()`` adds ``"attnproto"`` to Hugging Face transformers'
  attention and mask interfaces (``attn_implementation="attnproto"``), GQA in the kernel;
* :mod:`.mlx` — our Metal flash kernel through MLX's ``mx.fast.metal_kernel`` (statically
  checked on Linux, never run on a Mac).

Importing this package needs neither torch, transformers nor mlx; its submodules do (mlx only
when called).
"""
