//! Preparing the kernel of a run: inspect a user's kernel (before provisioning, so a bad one
//! fails in a second), provision, check the config against the profiles, and cache it.

use std::fs;
use std::path::{Path, PathBuf};

use log::debug;

use super::config::{check, requirements, CheckReport, Evidence, KConfig, Need};
use super::entry::{image_entry_name, make_entry, tree_entry_name, tree_release, Inspected};
use super::image::{
    config_near_modules, ikconfig, image_release, read_module_lists, resolve_modules_dir,
};
use super::{io_err, KernelError, KernelSource};
use crate::vm::profile::VmProfile;
use crate::vm::provision::{self, ProvisionEnv};

/// What [`prepare`] did, for the report.
#[derive(Debug, Clone)]
pub struct PreparedKernel {
    /// The kernel as asked for ([`KernelSource::describe`]).
    pub what: String,
    /// Its cache entry (`debian-6.12`, `image-<hash>`, `tree-<hash>`).
    pub entry: String,
    /// Its release.
    pub kver: String,
    /// The configuration check.
    pub check: CheckReport,
    /// Whether our guest modules can be built for it (a Debian series, a tree, an image whose
    /// module directory's `build` link names a build tree on this host).
    pub can_build_modules: bool,
}

/// The build tree a module directory's `build` link names, if it is one on this host (has a
/// `Makefile` and a `Module.symvers`), canonical.
pub fn build_link_tree(moddir: &Path) -> Option<PathBuf> {
    let t = fs::canonicalize(moddir.join("build")).ok()?;
    (t.join("Makefile").is_file() && t.join("Module.symvers").is_file()).then_some(t)
}

fn inspect_image(image: &Path, modules: Option<&Path>) -> Result<Inspected, KernelError> {
    let data = fs::read(image).map_err(io_err("Cannot read the kernel image", image))?;
    let kver = image_release(&data).ok_or_else(|| {
        KernelError::Unusable(format!(
            "{} is not an x86 bzImage/vmlinuz (no kernel_version in its setup header)",
            image.display()
        ))
    })?;
    let mut ev = Evidence::default();
    let moddir = match modules {
        Some(dir) => {
            let m = resolve_modules_dir(dir, &kver)?;
            read_module_lists(&m, &mut ev);
            if let Some(cfg) = config_near_modules(dir, &m, &kver) {
                let text = fs::read_to_string(&cfg).map_err(io_err("Cannot read", &cfg))?;
                ev.config = Some((KConfig::parse(&text), cfg.display().to_string()));
            }
            Some(m)
        }
        None => None,
    };
    if ev.config.is_none() {
        if let Some(text) = ikconfig(&data) {
            ev.config = Some((
                KConfig::parse(&text),
                format!("{} (embedded, CONFIG_IKCONFIG)", image.display()),
            ));
        }
    }
    if ev.config.is_none() && moddir.is_none() {
        return Err(KernelError::Unusable(format!(
            "{}: no config to check (no --modules DIR with a config, and no embedded CONFIG_IKCONFIG) and no module tree: pass --modules DIR (its INSTALL_MOD_PATH tree)",
            image.display()
        )));
    }
    let kdir = moddir.as_deref().and_then(build_link_tree);
    Ok(Inspected {
        kver,
        image_path: image.to_path_buf(),
        image: data,
        moddir,
        evidence: ev,
        kdir,
    })
}

fn inspect_tree(tree: &Path) -> Result<Inspected, KernelError> {
    let config_path = tree.join(".config");
    let bz = tree.join("arch/x86/boot/bzImage");
    if !config_path.is_file() || !bz.is_file() {
        return Err(KernelError::Unusable(format!(
            "--kernel-tree {}: not a built Linux tree (need .config and arch/x86/boot/bzImage: run make there first)",
            tree.display()
        )));
    }
    let text = fs::read_to_string(&config_path).map_err(io_err("Cannot read", &config_path))?;
    let data = fs::read(&bz).map_err(io_err("Cannot read", &bz))?;
    let kver = tree_release(tree)
        .or_else(|| image_release(&data))
        .ok_or_else(|| {
            KernelError::Unusable(format!(
                "--kernel-tree {}: no include/config/kernel.release",
                tree.display()
            ))
        })?;
    Ok(Inspected {
        kver,
        image_path: bz,
        image: data,
        moddir: None,
        evidence: Evidence {
            config: Some((KConfig::parse(&text), config_path.display().to_string())),
            ..Evidence::default()
        },
        kdir: Some(fs::canonicalize(tree).map_err(io_err("Cannot resolve", tree))?),
    })
}

/// `tree` as seen chrooted into `root` (`/usr/src/...`), if it lies inside `root` (both
/// canonicalised); `None` for a tree elsewhere.
pub fn path_in_root(root: &Path, tree: &Path) -> Option<PathBuf> {
    let root = fs::canonicalize(root).ok()?;
    let tree = fs::canonicalize(tree).ok()?;
    let rel = tree.strip_prefix(&root).ok()?;
    Some(Path::new("/").join(rel))
}

/// Selects, checks and (for a user's kernel) caches the guest kernel of a run, and provisions
/// the rest. The configuration is checked against `profiles` before anything is booted (for a
/// user's kernel even before provisioning; the debug kernel is built after provisioning, into
/// the root provisioning made, and checked then). Returns the provisioning environment pointing
/// at the chosen kernel (`kernel`, `kver`, `modules`, `kconfig`; for a tree `kdir_host`, or
/// `kheaders` when the tree lies inside the trixie root and is built against chrooted).
pub fn prepare(
    source: &KernelSource,
    profiles: &[VmProfile],
    share: bool,
    scripts: &Path,
    log: &Path,
) -> Result<(ProvisionEnv, PreparedKernel), KernelError> {
    let mut reqs = requirements(profiles);
    if matches!(source, KernelSource::Image { modules: None, .. }) {
        // No module tree to load anything from: every option must be built in.
        for r in &mut reqs {
            r.need = Need::Builtin;
        }
    }
    let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
    let names = names.join(", ");
    let mut what = source.describe();
    // A user's kernel is inspected first: a bad one fails in a second, before provisioning.
    let inspected = match source {
        KernelSource::Series(_) | KernelSource::Debug { .. } => None,
        KernelSource::Image { image, modules } => Some(inspect_image(image, modules.as_deref())?),
        KernelSource::Tree(tree) => Some(inspect_tree(tree)?),
    };
    if let Some(i) = &inspected {
        let report = check(&reqs, &i.evidence, share);
        if let Some(e) = report.error(&format!("{what}, {}", i.kver), &names) {
            return Err(e);
        }
    }
    let mut env = provision::provision(scripts, source.provision_series(), log)?;
    // The debug kernel: built (or found in the cache) now that the root exists, then a tree.
    let (inspected, tree) = match source {
        KernelSource::Debug { series, variant } => {
            let b = super::debug::build(scripts, series, variant, log)?;
            what = format!("{what}: {}; tree {}", b.source, b.tree.display());
            let i = inspect_tree(&b.tree)?;
            let report = check(&reqs, &i.evidence, share);
            if let Some(e) = report.error(&format!("{what}, {}", i.kver), &names) {
                return Err(e);
            }
            (Some(i), Some(b.tree))
        }
        KernelSource::Tree(t) => (inspected, Some(t.clone())),
        _ => (inspected, None),
    };
    let Some(i) = inspected else {
        let mut ev = Evidence::default();
        let text = fs::read_to_string(&env.kconfig).map_err(io_err("Cannot read", &env.kconfig))?;
        ev.config = Some((KConfig::parse(&text), env.kconfig.display().to_string()));
        let report = check(&reqs, &ev, share);
        if let Some(e) = report.error(&format!("{what}, {}", env.kver), &names) {
            return Err(e);
        }
        let entry = env
            .kernel
            .parent()
            .and_then(Path::file_name)
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let kver = env.kver.clone();
        return Ok((
            env,
            PreparedKernel {
                what,
                entry,
                kver,
                check: report,
                can_build_modules: true,
            },
        ));
    };
    let report = check(&reqs, &i.evidence, share);
    let guest = env.cache.join("guest");
    let entry_name = match &tree {
        Some(tree) => tree_entry_name(tree),
        None => image_entry_name(&i.image, &i.kver, i.moddir.as_deref()),
    };
    // A tree inside the trixie root (the debug kernel, or a user's tree built there) was built
    // with the root's compiler: its modules are installed and ours built chrooted into the root.
    let in_root = tree
        .as_deref()
        .and_then(|t| path_in_root(&env.kbuild_root, t));
    let entry = guest.join(&entry_name);
    if entry.join("kver").is_file() {
        debug!("guest kernel {}: cached entry {}", i.kver, entry.display());
    } else {
        let chroot = in_root.as_deref().map(|t| (env.kbuild_root.as_path(), t));
        make_entry(&guest, &entry, &i, tree.as_deref(), chroot, &reqs, log)?;
    }
    env.kernel = entry.join("vmlinuz");
    env.modules = entry.join("modules");
    env.kver = i.kver.clone();
    env.kconfig = entry.join("config");
    let can_build_modules = i.kdir.is_some();
    match (&i.kdir, in_root) {
        (Some(_), Some(t)) => env.kheaders = t,
        (Some(kdir), None) => env.kdir_host = Some(kdir.clone()),
        (None, _) => {}
    }
    Ok((
        env,
        PreparedKernel {
            what,
            entry: entry_name,
            kver: i.kver,
            check: report,
            can_build_modules,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::{fake_bzimage, full_config, gzip, scratch};
    use crate::vm::profile::ProfileId;

    #[test]
    fn test_path_in_root() {
        let d = scratch("inroot");
        let root = d.join("root");
        fs::create_dir_all(root.join("usr/src/t")).unwrap();
        fs::create_dir_all(d.join("elsewhere")).unwrap();
        assert_eq!(
            path_in_root(&root, &root.join("usr/src/t")),
            Some(PathBuf::from("/usr/src/t"))
        );
        // Through a path with `..` in it too (both sides canonicalised).
        assert_eq!(
            path_in_root(&root, &d.join("elsewhere/../root/usr/src/t")),
            Some(PathBuf::from("/usr/src/t"))
        );
        assert_eq!(path_in_root(&root, &d.join("elsewhere")), None);
        assert_eq!(path_in_root(&root, &d.join("missing")), None);
        fs::remove_dir_all(&d).unwrap();
    }

    /// A user kernel that lacks VFIO fails in `prepare` before provisioning (the scripts
    /// directory given does not even exist) and names CONFIG_VFIO; a tree without bzImage is
    /// refused clearly.
    #[test]
    fn test_prepare_fails_before_provisioning_on_missing_config() {
        let d = scratch("prepare");
        let t = d.join("tree");
        fs::create_dir_all(t.join("arch/x86/boot")).unwrap();
        fs::create_dir_all(t.join("include/config")).unwrap();
        let e = prepare(
            &KernelSource::Tree(t.clone()),
            &[ProfileId::Gpu.profile()],
            false,
            &d.join("no-scripts"),
            &d.join("log"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a built Linux tree"), "{e}");
        fs::write(
            t.join("arch/x86/boot/bzImage"),
            fake_bzimage("6.12.0-t", b""),
        )
        .unwrap();
        fs::write(t.join("include/config/kernel.release"), "6.12.0-t\n").unwrap();
        fs::write(
            t.join(".config"),
            full_config().replace("CONFIG_VFIO=m\n", "# CONFIG_VFIO is not set\n"),
        )
        .unwrap();
        let e = prepare(
            &KernelSource::Tree(t.clone()),
            &[ProfileId::Gpu.profile()],
            false,
            &d.join("no-scripts"),
            &d.join("log"),
        )
        .unwrap_err();
        assert!(matches!(e, KernelError::Config(_)), "{e}");
        assert!(e.to_string().contains("CONFIG_VFIO is not set"), "{e}");
        // The same through an image whose modules directory carries the config.
        let m = d.join("mods/lib/modules/6.12.0-t");
        fs::create_dir_all(&m).unwrap();
        fs::write(m.join("modules.dep"), "").unwrap();
        fs::copy(t.join(".config"), m.join("config")).unwrap();
        let e = prepare(
            &KernelSource::Image {
                image: t.join("arch/x86/boot/bzImage"),
                modules: Some(d.join("mods")),
            },
            &[ProfileId::Gpu.profile()],
            false,
            &d.join("no-scripts"),
            &d.join("log"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("CONFIG_VFIO is not set"), "{e}");
        // With the option on, the check passes and prepare goes on to provisioning (which
        // fails here: the instrument above is not just "prepare always fails").
        fs::write(m.join("config"), full_config()).unwrap();
        let e = prepare(
            &KernelSource::Image {
                image: t.join("arch/x86/boot/bzImage"),
                modules: Some(d.join("mods")),
            },
            &[ProfileId::Gpu.profile()],
            false,
            &d.join("no-scripts"),
            &d.join("log"),
        )
        .unwrap_err();
        assert!(matches!(e, KernelError::Provision(_)), "{e}");
        // An image without --modules: its embedded config must have everything built in.
        let mut vmlinux = b"IKCFG_ST".to_vec();
        vmlinux.extend(gzip(full_config().as_bytes()));
        vmlinux.extend_from_slice(b"IKCFG_ED");
        let bz = d.join("bzImage-ikconfig");
        fs::write(&bz, fake_bzimage("6.12.0-t", &vmlinux)).unwrap();
        let no_modules = KernelSource::Image {
            image: bz.clone(),
            modules: None,
        };
        let run = |src: &KernelSource| {
            prepare(
                src,
                &[ProfileId::Gpu.profile()],
                false,
                &d.join("no-scripts"),
                &d.join("log"),
            )
            .unwrap_err()
        };
        let e = run(&no_modules).to_string();
        assert!(e.contains("CONFIG_VFIO =m (need =y"), "{e}");
        assert!(e.contains("(embedded, CONFIG_IKCONFIG)"), "{e}");
        let mut vmlinux = b"IKCFG_ST".to_vec();
        vmlinux.extend(gzip(full_config().replace("=m\n", "=y\n").as_bytes()));
        vmlinux.extend_from_slice(b"IKCFG_ED");
        fs::write(&bz, fake_bzimage("6.12.0-t", &vmlinux)).unwrap();
        assert!(matches!(run(&no_modules), KernelError::Provision(_)));
        // And no config at all without modules: refused, saying so.
        fs::write(&bz, fake_bzimage("6.12.0-t", b"")).unwrap();
        let e = run(&no_modules).to_string();
        assert!(e.contains("no config to check"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
