"""A tiny, untrained Coqui VITS model made on the spot: the real file layout and loading code
without downloading weights (there is no network here)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_vits(model_dir: Path) -> tuple[Path, Path]:
    """A tiny, untrained VITS saved as checkpoint + config.json in ``model_dir``, the layout Coqui loads."""
    import torch
    from TTS.tts.configs.shared_configs import CharactersConfig
    from TTS.tts.configs.vits_config import VitsArgs, VitsConfig
    from TTS.tts.models.vits import Vits

    config = VitsConfig(
        model_args=VitsArgs(
            hidden_channels=16,
            hidden_channels_ffn_text_encoder=32,
            num_layers_text_encoder=1,
            num_layers_posterior_encoder=1,
            num_layers_flow=1,
            upsample_initial_channel_decoder=16,
            init_discriminator=False,
        ),
        use_phonemes=False,  # plain characters: no espeak/gruut needed
        text_cleaner="english_cleaners",
        characters=CharactersConfig(
            characters_class="TTS.tts.models.vits.VitsCharacters",
            characters="abcdefghijklmnopqrstuvwxyz",
            punctuations="!'(),-.:;? ",
            pad="<PAD>",
            eos="<EOS>",
            bos="<BOS>",
            blank="<BLNK>",
        ),
    )
    model = Vits(config)
    # Coqui loads {"model": state_dict} with torch.load(weights_only=True): plain tensors only.
    torch.save({"model": model.state_dict()}, model_dir / "model.pth")
    config.save_json(str(model_dir / "config.json"))
    return model_dir / "model.pth", model_dir / "config.json"
