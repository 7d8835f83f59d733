//! `konor-chaos`: runs and checks chaos runs (docs/testing.md, "Chaos").

fn main() -> anyhow::Result<()> {
    anyhow::bail!("konor-chaos: not built yet (issue 13)")
}
