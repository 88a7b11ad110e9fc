"""fnserve's Pulumi stacks: one module per target, each with `build(config) -> outputs` and no side effects at
import. `__main__.py` picks the module named by the stack's `fnserve:target`."""
