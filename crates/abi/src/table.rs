//! `abi_table!`: declares documented constants and, from the same lines, a table of them, so
//! that the generated C header (see [`crate::c`]) can never miss or misname one.

/// Declares `pub const NAME: TYPE = VALUE;` for every line (keeping its doc comment) and a
/// `pub const TABLE: &[crate::c::Define]` listing them in order, with their docs.
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
        pub const $table: &[$crate::c::Define] = &[
            $(
                $crate::c::Define {
                    name: stringify!($name),
                    value: $name as u64,
                    doc: concat!($($doc, "\n",)*),
                },
            )*
        ];
    };
}
