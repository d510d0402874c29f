//! `hako template build|list|rm`: the operator's hand on the template store (ADR 14).

use anyhow::Context;
use hako_shim::config::Config;
use hako_shim::vmm::template::{Meta, Store};

/// What `hako template` does. Templates let pods start from a saved VM of their shape instead
/// of booting one.
#[derive(clap::Subcommand)]
pub enum Action {
    /// Lists the templates in hypervisor.template_dir, with their shape and size.
    List,
    /// (Re)makes the template of the configuration's shape now, so that the next pod need not.
    Build,
    /// Removes one template, or all; the next start of that shape makes it again.
    Rm {
        /// The template's key, as `list` shows it.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        key: Option<String>,
        /// Every template.
        #[arg(long)]
        all: bool,
    },
}

pub fn command(action: Action) -> anyhow::Result<bool> {
    let config = Config::load(None)?.config;
    let store = Store::new(
        &config.hypervisor.template_dir,
        &config.runtime.sandbox_root,
    );
    match action {
        Action::List => list(&store),
        Action::Build => build(&config),
        Action::Rm { all: true, .. } => {
            for (key, _) in store.list() {
                store.remove(&key);
                println!("removed {key}");
            }
            Ok(true)
        }
        Action::Rm { key, .. } => {
            let key = key.unwrap_or_default();
            if !store.list().iter().any(|(k, _)| *k == key) {
                anyhow::bail!("no template {key:?} in {}", store.dir.display());
            }
            store.remove(&key);
            println!("removed {key}");
            Ok(true)
        }
    }
}

fn list(store: &Store) -> anyhow::Result<bool> {
    let found = store.list();
    if found.is_empty() {
        println!("no templates in {}", store.dir.display());
    }
    for (key, meta) in found {
        match meta {
            Some(meta) => println!("{key}  {}", describe(&meta)),
            None => println!("{key}  (incomplete: no metadata; it is made again when used)"),
        }
    }
    Ok(true)
}

/// The VMM, vCPUs, memory, size and age of a template.
pub fn describe(meta: &Meta) -> String {
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|now| now.as_secs().saturating_sub(meta.created_unix))
        .unwrap_or(0);
    format!(
        "{}, {} vCPU, {} MiB memory, {:.1} MiB saved, made {} min ago",
        meta.vmm,
        meta.vcpus,
        meta.memory_mib,
        meta.data() as f64 / 1048576.0,
        age / 60
    )
}

fn build(config: &Config) -> anyhow::Result<bool> {
    println!("booting a VM of the configuration's shape and saving it (seconds with KVM, longer under TCG)");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let made = runtime.block_on(hako_shim::vmm::template::build_for_config(config))?;
    println!(
        "made template {} in {}: {}",
        made.key,
        config.hypervisor.template_dir.display(),
        describe(&made.meta)
    );
    Ok(true)
}
