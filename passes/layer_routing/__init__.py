"""Layer routing: decode skips the layers that change the hidden state least.

    layer_routing   mode per_prompt: prefill runs every layer and measures how much each changes
                    the prompt's last hidden states; decode then skips the `max_skip` that changed
                    it least (an If per layer on a runtime flag; a skipped layer's cache is not
                    extended). mode static: a fixed set chosen on calibration text (the baseline).
"""

from optc.passes.layer_routing.pass_ import LayerRouting, LayerRoutingOptions

__all__ = ["LayerRouting", "LayerRoutingOptions"]
