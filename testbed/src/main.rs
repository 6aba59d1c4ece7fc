//! `harbor-standin`: the demo's Harbor. Starts a [`testbed::Testbed`] with the default projects and
//! images, prints one JSON line with the URLs, credentials and seeded digests, then runs until
//! SIGTERM/SIGINT and removes its registry child and temp dirs.

use signal_hook::consts::{SIGINT, SIGTERM};

fn main() -> anyhow::Result<()> {
    let user = std::env::var("STANDIN_ROBOT_USER")
        .unwrap_or_else(|_| testbed::DEFAULT_ROBOT_USER.to_string());
    let password = std::env::var("STANDIN_ROBOT_PASSWORD")
        .unwrap_or_else(|_| testbed::DEFAULT_ROBOT_PASSWORD.to_string());
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let config = testbed::HarborConfig {
        robot: Some((user.clone(), password.clone())),
        ..Default::default()
    };
    let bed = testbed::Testbed::start(config)?;
    let seeded = bed.seed(&testbed::default_images())?;
    let images: Vec<_> = seeded
        .iter()
        .map(|s| serde_json::json!({"repository": s.repository, "tag": s.tag, "digest": s.digest}))
        .collect();
    let line = serde_json::json!({
        "harbor_url": bed.harbor.url(),
        "registry_url": bed.registry.url(),
        "robot_user": user,
        "robot_password": password,
        "images": images,
    });
    println!("{line}");
    signals.forever().next();
    drop(bed);
    Ok(())
}
