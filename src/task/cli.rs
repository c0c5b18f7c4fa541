//! `softprompt inspect`: a person's view of task files.

use std::path::{Path, PathBuf};

use super::{Task, native, peft};

/// Arguments of `softprompt inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A native task file, a PEFT adapter directory, or a directory of them.
    pub path: PathBuf,
}

/// Reads any task file or PEFT adapter directory.
pub fn read_any(path: &Path) -> Result<Task, super::TaskError> {
    if path.is_dir() {
        peft::read_dir(path, None)
    } else {
        native::read_file(path)
    }
}

fn describe(path: &Path, task: &Task) -> String {
    let m = &task.model;
    let mut s = format!("{}\n", path.display());
    s += &format!("  version      {}\n", task.version);
    s += &format!("  kind         {:?}\n", task.kind());
    if let Some(sp) = &m.shallow {
        s += &format!(
            "  shallow      {} virtual tokens, template {:?}\n",
            sp.template.num_virtual(),
            sp.template.to_string()
        );
    }
    if let Some(d) = &m.deep {
        s += &format!(
            "  deep         {} prefix tokens × {} values per token\n",
            d.dims()[0],
            d.dims()[1]
        );
    }
    s += &format!(
        "  labels       {}: {:?}\n",
        task.meta.labels.len(),
        task.meta.labels
    );
    s += &format!("  pooling      {}\n", task.meta.pooling.as_str());
    s += &format!(
        "  base model   {} {}\n",
        if task.meta.base_model.name.is_empty() {
            "(unnamed)"
        } else {
            &task.meta.base_model.name
        },
        task.meta
            .base_model
            .fingerprint
            .as_deref()
            .unwrap_or("(no fingerprint)")
    );
    let p = &task.meta.provenance;
    if !p.method.is_empty() {
        s += &format!("  method       {}\n", p.method);
    }
    if let Some(d) = &p.data {
        s += &format!("  data         {d}\n");
    }
    if !p.metrics.is_null() {
        s += &format!("  metrics      {}\n", p.metrics);
    }
    if let Some(c) = &p.created {
        s += &format!("  created      {c}\n");
    }
    s += &format!("  tensor bytes {}\n", task.tensor_bytes());
    s
}

/// Prints one task, or every task in a directory (bad ones are reported,
/// not fatal).
pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let p = &args.path;
    let is_adapter = p.join(peft::CONFIG_FILE).is_file();
    if p.is_dir() && !is_adapter {
        let mut entries: Vec<_> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        entries.sort();
        let mut found = 0;
        for e in entries {
            let is_task = e.extension().is_some_and(|x| x == native::EXTENSION)
                || e.join(peft::CONFIG_FILE).is_file();
            if !is_task {
                continue;
            }
            found += 1;
            match read_any(&e) {
                Ok(t) => print!("{}", describe(&e, &t)),
                Err(err) => println!("{}\n  ERROR        {err}", e.display()),
            }
        }
        if found == 0 {
            anyhow::bail!(
                "{}: no task files (*.safetensors or PEFT adapter directories)",
                p.display()
            );
        }
        return Ok(());
    }
    let t = read_any(p)?;
    print!("{}", describe(p, &t));
    Ok(())
}
