//! The contract described as data: `abi_table!` declares documented constants and, from the same
//! lines, a table of them ([`Define`]); [`Struct`] and [`Field`] describe a fixed-layout entry. The
//! generated C header (see [`crate::c`]) is written from these, so it can never miss or misname
//! one. This module is a leaf: the function modules (`gpu`, `npu`, `ids`) describe themselves
//! with it, and `c` reads their tables, so the dependency goes one way (function modules →
//! `table` ← `c` → function modules).

/// Declares `pub const NAME: TYPE = VALUE;` for every line (keeping its doc comment) and a
/// `pub const TABLE: &[crate::table::Define]` listing them in order, with their docs.
///
/// ```text
/// abi_table! {
///     /// Doc of the table.
///     TABLE;
///     /// Doc of A.
///     A: u32 = 1;
/// }
/// ```
macro_rules! abi_table {
    (
        $(#[doc = $tdoc:literal])*
        $table:ident;
        $(
            $(#[doc = $doc:literal])*
            $name:ident : $ty:ty = $val:expr;
        )*
    ) => {
        $(
            $(#[doc = $doc])*
            pub const $name: $ty = $val;
        )*
        $(#[doc = $tdoc])*
        pub const $table: &[$crate::table::Define] = &[
            $(
                $crate::table::Define {
                    name: stringify!($name),
                    value: $name as u64,
                    doc: concat!($($doc, "\n",)*),
                },
            )*
        ];
    };
}

/// One `#define`: a constant of this crate with its doc comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Define {
    /// The Rust name (the C name adds the section's prefix).
    pub name: &'static str,
    /// The value.
    pub value: u64,
    /// The doc comment, one line per doc line.
    pub doc: &'static str,
}

/// One field of a fixed-layout entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Field name in C.
    pub name: &'static str,
    /// Byte offset in the entry.
    pub offset: usize,
    /// Size of one element in bytes (1, 2, 4 or 8).
    pub size: usize,
    /// Number of elements (1: a scalar, else an array).
    pub count: usize,
    /// What it holds.
    pub doc: &'static str,
}

impl Field {
    /// A field.
    pub const fn new(
        name: &'static str,
        offset: usize,
        size: usize,
        count: usize,
        doc: &'static str,
    ) -> Field {
        Field {
            name,
            offset,
            size,
            count,
            doc,
        }
    }
}

/// A fixed-layout little-endian entry (a ring or queue entry).
#[derive(Debug, Clone, Copy)]
pub struct Struct {
    /// The C struct name.
    pub name: &'static str,
    /// Total size in bytes.
    pub size: usize,
    /// What it is.
    pub doc: &'static str,
    /// The fields in offset order, covering every byte.
    pub fields: &'static [Field],
}
