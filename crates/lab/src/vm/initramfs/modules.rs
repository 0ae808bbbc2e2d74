//! Kernel modules: names, `modules.dep` resolution, reading (and decompressing) `.ko` files.

use super::*;

/// The module name of a module file path: `kernel/drivers/vfio/pci/vfio-pci.ko.xz` → `vfio_pci`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split('.').next().unwrap_or(base);
    stem.replace('-', "_")
}

/// The dependency information of a kernel's module tree (`modules.dep`, `modules.builtin`).
#[derive(Debug, Default)]
pub struct ModuleDeps {
    /// Module path (as in modules.dep) → the paths it depends on.
    pub(super) deps: HashMap<String, Vec<String>>,
    /// Module name → its path.
    by_name: HashMap<String, String>,
    /// Names of modules built into the kernel.
    builtin: HashSet<String>,
    /// Module name → (`pre:` names, `post:` names) from `modules.softdep`.
    softdeps: HashMap<String, (Vec<String>, Vec<String>)>,
}

impl ModuleDeps {
    /// Parses `modules.dep` text (`path: dep dep ...` per line).
    pub fn parse(modules_dep: &str) -> Result<Self, InitramfsError> {
        let mut me = ModuleDeps::default();
        for (i, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) = line
                .split_once(':')
                .filter(|(p, _)| !p.trim().is_empty())
                .ok_or_else(|| InitramfsError::BadModulesDep {
                    line: i + 1,
                    text: line.to_string(),
                })?;
            let path = path.trim().to_string();
            let deps = deps.split_whitespace().map(str::to_string).collect();
            me.by_name.insert(module_name(&path), path.clone());
            me.deps.insert(path, deps);
        }
        Ok(me)
    }

    /// Adds the names listed in `modules.builtin` (one module path per line).
    pub fn add_builtin(&mut self, modules_builtin: &str) {
        self.builtin.extend(
            modules_builtin
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| module_name(l.trim())),
        );
    }

    /// Adds the soft dependencies of `modules.softdep` (`softdep MOD pre: A B post: C D`). Soft
    /// dependencies that do not exist for this kernel are ignored when resolving.
    pub fn add_softdeps(&mut self, modules_softdep: &str) {
        for line in modules_softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let entry = self.softdeps.entry(module.replace('-', "_")).or_default();
            let mut post = false;
            for w in words {
                match w {
                    "pre:" => post = false,
                    "post:" => post = true,
                    name if post => entry.1.push(name.replace('-', "_")),
                    name => entry.0.push(name.replace('-', "_")),
                }
            }
        }
    }

    /// Whether the kernel has module `name`, loadable or built in.
    pub fn has(&self, name: &str) -> bool {
        let name = name.replace('-', "_");
        self.by_name.contains_key(&name) || self.builtin.contains(&name)
    }

    /// Reads `modules.dep` and (if present) `modules.builtin` and `modules.softdep` from a
    /// `lib/modules/<kver>` dir.
    pub fn load(dir: &Path) -> Result<Self, InitramfsError> {
        let dep_path = dir.join("modules.dep");
        let text = fs::read_to_string(&dep_path).map_err(io_err("Cannot read", &dep_path))?;
        let mut me = Self::parse(&text)?;
        let builtin = dir.join("modules.builtin");
        match fs::read_to_string(&builtin) {
            Ok(text) => me.add_builtin(&text),
            Err(e) => debug!("no {}: {e}", builtin.display()),
        }
        let softdep = dir.join("modules.softdep");
        match fs::read_to_string(&softdep) {
            Ok(text) => me.add_softdeps(&text),
            Err(e) => debug!("no {}: {e}", softdep.display()),
        }
        Ok(me)
    }

    /// The module paths to load, dependencies first, for the given module names (`-` and `_`
    /// are equivalent). Soft dependencies are honoured (`pre:` before, `post:` after the module)
    /// when they exist. Built-in modules are skipped; each module appears once.
    pub fn load_order(&self, roots: &[&str]) -> Result<Vec<String>, InitramfsError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut active = HashSet::new();
        for root in roots {
            let name = root.replace('-', "_");
            match self.by_name.get(&name) {
                Some(path) => self.visit(path, &mut order, &mut done, &mut active)?,
                None if self.builtin.contains(&name) => debug!("module {name} is built in"),
                None => return Err(InitramfsError::ModuleNotFound(name)),
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        order: &mut Vec<String>,
        done: &mut HashSet<String>,
        active: &mut HashSet<String>,
    ) -> Result<(), InitramfsError> {
        if done.contains(path) {
            return Ok(());
        }
        if !active.insert(path.to_string()) {
            return Err(InitramfsError::ModuleCycle(module_name(path)));
        }
        let deps = self
            .deps
            .get(path)
            .ok_or_else(|| InitramfsError::ModuleNotFound(module_name(path)))?;
        let (pre, post) = self
            .softdeps
            .get(&module_name(path))
            .map(|(a, b)| (a.as_slice(), b.as_slice()))
            .unwrap_or_default();
        let existing = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter_map(|n| self.by_name.get(n).cloned())
                .collect()
        };
        for dep in existing(pre).iter().chain(deps) {
            self.visit(dep, order, done, active)?;
        }
        active.remove(path);
        done.insert(path.to_string());
        order.push(path.to_string());
        for dep in existing(post) {
            // A post dependency may depend on this module (vfio_iommu_type1 on vfio).
            self.visit(&dep, order, done, active)?;
        }
        Ok(())
    }
}

/// Reads a module file, decompressing `.ko.xz`. Returns the `.ko` bytes.
pub fn read_module(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let name = path.to_string_lossy();
    let data = fs::read(path).map_err(io_err("Cannot read", path))?;
    if name.ends_with(".ko") {
        Ok(data)
    } else if name.ends_with(".ko.xz") {
        let mut out = Vec::with_capacity(data.len() * 4);
        lzma_rs::xz_decompress(&mut io::Cursor::new(&data), &mut out).map_err(|e| {
            InitramfsError::Decompress {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(out)
    } else {
        Err(InitramfsError::UnsupportedCompression(path.to_path_buf()))
    }
}

/// `kernel/x/vfio.ko.xz` → `kernel/x/vfio.ko`.
pub(super) fn plain_ko_path(path: &str) -> String {
    match path.find(".ko") {
        Some(i) => format!("{}.ko", &path[..i]),
        None => path.to_string(),
    }
}
