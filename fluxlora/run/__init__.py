"""One run from a composed config: settings parsed once, model and cache, module and trainer, fit, report; resume."""
