"""Print the README's configuration reference table, generated from the config schema."""

from finegrained.config_reference import render_reference

if __name__ == "__main__":
    print(render_reference())
