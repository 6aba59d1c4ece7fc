//! What the test bed's own tests share: an image to seed, a bed with images seeded, a client that
//! does not follow redirects.

use testbed::{HarborConfig, SeedImage, SeedKind, Seeded, Testbed};

pub fn image(repository: &str, tag: &str, kind: SeedKind) -> SeedImage {
    SeedImage {
        repository: repository.into(),
        tag: tag.into(),
        kind,
        layer_bytes: 100_000,
    }
}

pub fn bed_with(images: &[SeedImage]) -> (Testbed, Vec<Seeded>) {
    let bed = Testbed::start(HarborConfig::default()).unwrap();
    let seeded = bed.seed(images).unwrap();
    (bed, seeded)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}
