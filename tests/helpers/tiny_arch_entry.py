"""The table entry of the test-only backbone (tests/helpers/tiny_arch.py), JAX-free as every
entry is: registered by tests/plan/test_archs.py."""

from finegrained.plan.archs import Architecture

TINY = Architecture("tiny_test", "helpers.tiny_arch:tiny_test",
                    lambda stage_depths=None: {"stem": 2, "stage1": 4}, boundary="map",
                    block_freezing=False, depth_count=1, input_recipe="torchvision")
